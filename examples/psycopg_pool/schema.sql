-- The inventory service's schema. corral builds a template database from it once per
-- run (and once per schema change on a persistent server); every test process gets a
-- clone. Seed data belongs here too: it is in every clone and never rolled back.

CREATE TABLE product (
    id          bigserial PRIMARY KEY,
    sku         text NOT NULL UNIQUE CHECK (sku ~ '^[A-Z0-9-]{3,32}$'),
    name        text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stock (
    product_id bigint PRIMARY KEY REFERENCES product (id) ON DELETE CASCADE,
    on_hand    integer NOT NULL DEFAULT 0 CHECK (on_hand >= 0)
);

CREATE TABLE stock_movement (
    id         bigserial PRIMARY KEY,
    product_id bigint NOT NULL REFERENCES product (id) ON DELETE CASCADE,
    delta      integer NOT NULL CHECK (delta <> 0),
    reason     text NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE customer_order (
    id         bigserial PRIMARY KEY,
    customer   text NOT NULL,
    status     text NOT NULL DEFAULT 'placed'
               CHECK (status IN ('placed', 'shipped', 'cancelled')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE order_line (
    order_id    bigint NOT NULL REFERENCES customer_order (id) ON DELETE CASCADE,
    product_id  bigint NOT NULL REFERENCES product (id),
    quantity    integer NOT NULL CHECK (quantity > 0),
    price_cents integer NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (order_id, product_id)
);

-- Seed data: the house brand every deployment starts with.
INSERT INTO product (sku, name, price_cents) VALUES
    ('HOUSE-MUG', 'House mug', 900),
    ('HOUSE-TEE', 'House T-shirt', 1900);
INSERT INTO stock (product_id, on_hand) SELECT id, 100 FROM product;
