"""WSGI entry point, for tools that need one. The service itself runs under ASGI (config.asgi):
the chat endpoints are async and would hold a thread each under WSGI."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

application = get_wsgi_application()
