from django.apps import AppConfig
from django.db.backends.signals import connection_created


def _register_sqlite_functions(sender, connection, **kwargs) -> None:
    if connection.vendor == "sqlite":
        connection.connection.create_function(
            "CASEFOLD",
            1,
            lambda text: text.casefold() if text is not None else None,
            deterministic=True,
        )


class ChatConfig(AppConfig):
    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from chat import checks  # noqa: F401  (registers them)

        connection_created.connect(_register_sqlite_functions, dispatch_uid="chat-sqlite-casefold")
