"""System checks of the project's own.

Django's deploy checks security.W001-W003 look for its security, clickjacking and CSRF
middleware by their exact import paths, so the async-native subclasses this project uses
(config/django_middleware.py) would be reported missing. Those three are silenced in settings
and checked here instead, accepting Django's class or a subclass of it.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

REQUIRED_MIDDLEWARE = {
    "security.W001": "django.middleware.security.SecurityMiddleware",
    "security.W002": "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "security.W003": "django.middleware.csrf.CsrfViewMiddleware",
}


@checks.register(checks.Tags.security, deploy=True)
def middleware_present(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    installed = [import_string(path) for path in settings.MIDDLEWARE]
    problems: list[checks.CheckMessage] = []
    for silenced, required in REQUIRED_MIDDLEWARE.items():
        base = import_string(required)
        if not any(isinstance(cls, type) and issubclass(cls, base) for cls in installed):
            problems.append(
                checks.Warning(
                    f"{required} (or a subclass of it) is not in MIDDLEWARE.",
                    hint=f"Django's own {silenced} is silenced in favour of this check.",
                    id="chat.W001",
                )
            )
    return problems
