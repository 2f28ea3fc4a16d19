from django.apps import AppConfig
from django.db.backends.signals import connection_created
from django.db.models.signals import post_delete, post_save


def _register_sqlite_functions(sender, connection, **kwargs) -> None:
    if connection.vendor == "sqlite":
        connection.connection.create_function(
            "CASEFOLD",
            1,
            lambda text: text.casefold() if text is not None else None,
            deterministic=True,
        )


def _forget_cached_token(sender, instance, **kwargs) -> None:
    from chat.api.authentication import forget_cached_tokens

    forget_cached_tokens(key=instance.key)


def _forget_cached_tokens_of_users(sender, instance, update_fields=None, **kwargs) -> None:
    # A login saves last_login only: nothing a token's authentication depends on.
    if update_fields is not None and set(update_fields) == {"last_login"}:
        return
    from chat.api.authentication import forget_cached_tokens

    forget_cached_tokens()


class ChatConfig(AppConfig):
    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from chat import checks  # noqa: F401  (registers them)

        connection_created.connect(_register_sqlite_functions, dispatch_uid="chat-sqlite-casefold")
        # The token cache of chat.api.authentication forgets what changed in this process.
        from django.contrib.auth import get_user_model
        from rest_framework.authtoken.models import Token

        for signal in (post_save, post_delete):
            signal.connect(_forget_cached_token, sender=Token, dispatch_uid="chat-token-cache")
            signal.connect(
                _forget_cached_tokens_of_users,
                sender=get_user_model(),
                dispatch_uid="chat-token-cache-users",
            )
