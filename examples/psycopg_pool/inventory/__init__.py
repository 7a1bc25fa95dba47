"""An inventory service: products, stock and orders on a psycopg 3 connection pool."""
