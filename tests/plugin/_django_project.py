"""A Django project written by the tests: three apps, 60+ small migrations (schema changes,
``RunSQL`` steps, a ``RunPython`` that counts its runs in ``migrate_count.txt``, a data
migration), two database aliases (``replica`` mirrors ``default``) and a pytest-django
suite that uses ``db``, ``TestCase``, ``transactional_db``, ``serialized_rollback``,
``live_server`` and ``django_assert_num_queries``, under a conftest that overrides
``django_db_setup`` (requesting the parent one) to add data.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

#: Tests in the generated suite.
TESTS = 16
APPS = ("shop", "blog", "notes")

_SETTINGS = """\
import os

SECRET_KEY = "corral-test"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "proj.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "shop",
    "blog",
    "notes",
]
MIDDLEWARE = []
STATIC_URL = "/static/"
_SERVER = {{
    "ENGINE": "django.db.backends.postgresql",
    "NAME": "corral_django_app",
    "HOST": os.environ.get("DJ_HOST", "127.0.0.1"),
    "PORT": os.environ.get("DJ_PORT", "5432"),
    "USER": os.environ.get("DJ_USER", "postgres"),
    "PASSWORD": "",
}}
# Django's own ways to shape the test database (the tests set them through the environment).
_TEST = {{
    key: os.environ[f"DJ_{{key}}"]
    for key in ("CHARSET", "COLLATION", "TEMPLATE")
    if os.environ.get(f"DJ_{{key}}")
}}
DATABASES = {{
    "default": {{**_SERVER, "TEST": _TEST}},
    "replica": {{**_SERVER, "TEST": {{"MIRROR": "default"}}}},
}}
# {token}
"""

_URLS = """\
from django.http import HttpResponse
from django.urls import path

from shop.models import Product


def products(request):
    return HttpResponse(str(Product.objects.count()))


urlpatterns = [path("products/", products)]
"""

_INITIAL = """\
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="{model}",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=100)),
            ],
        ),
    ]
"""

_ADD_FIELD = """\
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("{app}", "{previous}")]
    operations = [
        migrations.AddField("{model_lower}", "{field}", models.IntegerField(default=0)),
    ]
"""

# A model of the kind real projects add: a relation, a date, an index (migrating it renders
# the related models' state, which is what makes a long migration history slow).
_CREATE_THING = """\
from django.db import migrations, models
import django.db.models.deletion


class Migration(migrations.Migration):
    dependencies = [("{app}", "{previous}")]
    operations = [
        migrations.CreateModel(
            name="{thing}",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=100, db_index=True)),
                ("created", models.DateTimeField(auto_now_add=True)),
                (
                    "owner",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, to="{app}.{model_lower}"
                    ),
                ),
            ],
        ),
    ]
"""

_ADD_TEXT = """\
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("{app}", "{previous}")]
    operations = [
        migrations.AddField("{thing_lower}", "{field}", models.TextField(blank=True, default="")),
    ]
"""

_RUN_SQL = """\
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("{app}", "{previous}")]
    operations = [migrations.RunSQL("SELECT {number}", migrations.RunSQL.noop)]
"""

_COUNTING = """\
from pathlib import Path

from django.db import migrations

COUNT = Path(__file__).resolve().parents[2] / "migrate_count.txt"


def count(apps, schema_editor):
    with COUNT.open("a") as file:
        file.write(schema_editor.connection.alias + "\\n")


class Migration(migrations.Migration):
    dependencies = [("{app}", "{previous}")]
    operations = [migrations.RunPython(count, migrations.RunPython.noop)]
"""

_CATEGORY = """\
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "{previous}")]
    operations = [
        migrations.CreateModel(
            name="Category",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=50, unique=True)),
            ],
        ),
    ]
"""

_DATA = """\
from django.db import migrations


def fill(apps, schema_editor):
    Category = apps.get_model("shop", "Category")
    for name in ("books", "music"):
        Category.objects.using(schema_editor.connection.alias).create(name=name)


class Migration(migrations.Migration):
    dependencies = [("shop", "{previous}")]
    operations = [migrations.RunPython(fill, migrations.RunPython.noop)]
"""

# A conftest that overrides django_db_setup and requests it, as projects do to load data:
# it gets corral's as its parent.
_CONFTEST = """\
import pytest


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    from notes.models import Note

    with django_db_blocker.unblock():
        Note.objects.create(name="from conftest")
"""

_TESTS = """\
import os
import urllib.request

import pytest
from django.conf import settings
from django.db import connection, connections
from django.test import TestCase, TransactionTestCase

from blog.models import Post
from notes.models import Note
from shop.models import Category, Product


def test_data_migration_rows(db):
    assert sorted(Category.objects.values_list("name", flat=True)) == ["books", "music"]


def test_conftest_data(db):
    assert Note.objects.filter(name="from conftest").count() == 1


def test_db_isolated_one(db):
    Product.objects.create(name="one")
    assert Product.objects.count() == 1


def test_db_isolated_two(db):
    Product.objects.create(name="two")
    assert Product.objects.count() == 1


def test_encoding(db):
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_encoding")
        assert cursor.fetchone()[0] == os.environ.get("DJ_CHARSET", "UTF8")


def test_on_a_clone(db):
    # Django's databases only: no database of corral's own for this process beside them.
    assert "CORRAL_DATABASE_URL" not in os.environ
    name = connection.settings_dict["NAME"]
    assert name.startswith("corral_"), name
    assert settings.DATABASES["default"]["NAME"] == name
    assert connections["replica"].settings_dict["NAME"] == name


def test_num_queries(db, django_assert_num_queries):
    with django_assert_num_queries(1):
        list(Post.objects.all())


@pytest.mark.django_db(databases=["default", "replica"])
def test_mirror_reads_the_clone():
    assert Category.objects.using("replica").count() == 2


def test_serialized_fixture(transactional_db, django_db_serialized_rollback):
    assert Category.objects.count() == 2


# Before the other transactional tests (pytest-django keeps file order within a kind):
# their flush re-creates content types under new ids, which Django's serialized data
# (taken after migrating) then collides with.
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_serialized_rollback_restores_rows():
    assert Category.objects.count() == 2
    Category.objects.all().delete()


def test_transactional(transactional_db):
    Note.objects.create(name="committed")
    assert Note.objects.filter(name="committed").count() == 1


def test_live_server(live_server):
    Product.objects.create(name="seen by the server")
    with urllib.request.urlopen(live_server.url + "/products/", timeout=10) as response:
        assert response.read() == b"1"


def test_blocker(django_db_blocker):
    with django_db_blocker.unblock():
        assert connection.settings_dict["NAME"].startswith("corral_")


class TestWithTestCase(TestCase):
    databases = {"default", "replica"}

    @classmethod
    def setUpTestData(cls):
        Product.objects.create(name="class data")

    def test_class_data(self):
        self.assertEqual(Product.objects.count(), 1)

    def test_rows(self):
        self.assertEqual(Category.objects.count(), 2)


class TestTransactionTestCase(TransactionTestCase):
    def test_write(self):
        Post.objects.create(name="post")
        self.assertEqual(Post.objects.count(), 1)
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _models(model: str, fields: int) -> str:
    lines = ["from django.db import models", "", "", f"class {model}(models.Model):"]
    lines.append("    name = models.CharField(max_length=100)")
    lines += [f"    f{i} = models.IntegerField(default=0)" for i in range(fields)]
    return "\n".join(lines) + "\n"


def _steps(app: str, model: str, migrations: int, typical: bool) -> tuple[list[str], str]:
    """The texts of *app*'s migrations 0002.. and the models they leave."""
    texts: list[str] = []
    previous, fields = "0001_initial", 0
    things: dict[str, list[str]] = {}
    for number in range(2, migrations + 1):
        common = {"app": app, "previous": previous, "model_lower": model.lower()}
        if typical and number % 3 == 0:
            thing = f"{model}Thing{number}"
            things[thing] = []
            text = _CREATE_THING.format(thing=thing, **common)
        elif typical and number % 3 == 2 and things:
            thing = list(things)[-1]
            field = f"text{number}"
            things[thing].append(field)
            text = _ADD_TEXT.format(thing_lower=thing.lower(), field=field, **common)
        elif number % 4 == 0 or typical:
            text = _ADD_FIELD.format(field=f"f{fields}", **common)
            fields += 1
        else:
            text = _RUN_SQL.format(number=number, **common)
        texts.append(text)
        previous = f"{number:04d}_step"
    source = _models(model, fields)
    for thing, texts_fields in things.items():
        source += f"\n\nclass {thing}(models.Model):\n"
        source += "    name = models.CharField(max_length=100, db_index=True)\n"
        source += "    created = models.DateTimeField(auto_now_add=True)\n"
        source += f"    owner = models.ForeignKey({model}, on_delete=models.CASCADE)\n"
        source += "".join(
            f'    {f} = models.TextField(blank=True, default="")\n' for f in texts_fields
        )
    return texts, source


def write_project(root: Path, *, token: str, migrations: int = 20, typical: bool = False) -> None:
    """Write the project into *root*; *token* makes its templates its own (it is part of
    the settings, hence of nothing that defines the template: a migration carries it too).

    :param migrations: migrations per app (so 3x in all, plus shop's extra ones).
    :param typical: migrations of the kind real projects have (a third create a model with a
        foreign key and an index, the others add fields), which make Django render model
        states as it migrates; else cheap ones (mostly ``RunSQL("SELECT n")``), as the
        tests want.
    """
    _write(root / "pytest.ini", "[pytest]\nDJANGO_SETTINGS_MODULE = proj.settings\n")
    _write(root / "proj" / "__init__.py", "")
    _write(root / "proj" / "settings.py", _SETTINGS.format(token=token))
    _write(root / "proj" / "urls.py", _URLS)
    models = {"shop": "Product", "blog": "Post", "notes": "Note"}
    for app, model in models.items():
        package = root / app
        _write(package / "__init__.py", "")
        migrations_dir = package / "migrations"
        _write(migrations_dir / "__init__.py", "")
        _write(migrations_dir / "0001_initial.py", _INITIAL.format(model=model))
        texts, model_source = _steps(app, model, migrations, typical)
        for number, text in enumerate(texts, start=2):
            _write(migrations_dir / f"{number:04d}_step.py", text)
        previous = f"{migrations:04d}_step" if migrations > 1 else "0001_initial"
        if app == "shop":
            extra = [
                ("counting", _COUNTING.format(app=app, previous=previous)),
                ("category", _CATEGORY.format(previous=f"{migrations + 1:04d}_counting")),
                ("data", _DATA.format(previous=f"{migrations + 2:04d}_category")),
                (
                    "token",
                    _RUN_SQL.format(
                        app=app, previous=f"{migrations + 3:04d}_data", number=f"'{token}'"
                    ),
                ),
            ]
            for offset, (label, text) in enumerate(extra, start=1):
                _write(migrations_dir / f"{migrations + offset:04d}_{label}.py", text)
            model_source += textwrap.dedent(
                """

                class Category(models.Model):
                    name = models.CharField(max_length=50, unique=True)
                """
            )
        _write(package / "models.py", model_source)
    _write(root / "tests" / "__init__.py", "")
    _write(root / "tests" / "conftest.py", _CONFTEST)
    _write(root / "tests" / "test_suite.py", _TESTS)


def migrate_count(root: Path) -> int:
    """How many times the counting migration ran (once per migrated database)."""
    path = root / "migrate_count.txt"
    return len(path.read_text().split()) if path.exists() else 0


def break_migration(root: Path) -> str:
    """Make one of shop's migrations fail; returns its name."""
    path = root / "shop" / "migrations" / "0003_step.py"
    path.write_text(
        path.read_text().replace(
            'migrations.RunSQL("SELECT 3"', 'migrations.RunSQL("SELECT * FROM no_such_table"'
        )
    )
    return "shop.0003_step"


def change_migration(root: Path) -> None:
    """Change one migration's contents (the template must be rebuilt)."""
    path = root / "blog" / "migrations" / "0002_step.py"
    path.write_text(path.read_text().replace('"SELECT 2"', '"SELECT 2 + 0"'))
