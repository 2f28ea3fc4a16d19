from django.apps import AppConfig


class WebConfig(AppConfig):
    """The browser chat page served at `/` (templates and static files, no build step)."""

    name = "web"
    verbose_name = "Web chat"
