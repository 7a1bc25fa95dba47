"""Products and orders over HTTP."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from shop.db import get_session
from shop.models import Order, Product

app = FastAPI()
SessionDep = Annotated[AsyncSession, Depends(get_session)]


class ProductIn(BaseModel):
    sku: str
    stock: int


class OrderIn(BaseModel):
    product_id: int
    quantity: int


@app.post("/products", status_code=201)
async def create_product(body: ProductIn, session: SessionDep) -> dict[str, int]:
    product = Product(sku=body.sku, stock=body.stock)
    session.add(product)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise HTTPException(409, "sku taken") from None
    return {"id": product.id}


@app.get("/products")
async def count_products(session: SessionDep) -> dict[str, int]:
    return {"count": await session.scalar(select(func.count()).select_from(Product)) or 0}


@app.post("/orders", status_code=201)
async def order(body: OrderIn, session: SessionDep) -> dict[str, int]:
    async with session.begin():
        taken = await session.execute(
            update(Product)
            .where(Product.id == body.product_id, Product.stock >= body.quantity)
            .values(stock=Product.stock - body.quantity)
        )
        if taken.rowcount != 1:
            raise HTTPException(409, "out of stock")
        new = Order(product_id=body.product_id, quantity=body.quantity)
        session.add(new)
    return {"id": new.id}
