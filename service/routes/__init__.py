"""Every route of the service, in the order the README documents them."""

from starlette.routing import BaseRoute

from service.routes import conversations, health, messages, users


def all_routes() -> list[BaseRoute]:
    return [*health.ROUTES, *users.ROUTES, *conversations.ROUTES, *messages.ROUTES]
