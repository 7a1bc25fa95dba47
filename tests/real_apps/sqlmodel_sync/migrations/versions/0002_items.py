"""items"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "item",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("title", sa.String, nullable=False),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("user.id"), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("item")
