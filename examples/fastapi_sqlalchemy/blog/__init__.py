"""A blog API: users, posts, comments and tags on FastAPI and async SQLAlchemy."""
