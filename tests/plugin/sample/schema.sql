CREATE TABLE item (
    id serial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    created timestamptz NOT NULL DEFAULT now()
);
INSERT INTO item (name) VALUES ('seed');
