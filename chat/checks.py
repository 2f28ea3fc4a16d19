"""System checks of the project's own.

Django's security checks recognise its security, clickjacking and CSRF middleware by their
exact import paths: with the async-native subclasses this project uses
(config/django_middleware.py) they would report the middleware missing (security.W001-W003,
silenced in settings) and skip every check that depends on it (HSTS, HTTPS redirect, secure
CSRF cookie, X-Frame-Options...). This check runs those same Django checks with each subclass
counted as the Django class it extends, so `check --deploy` reports exactly what it would with
Django's own middleware. (Django's session cookie checks need no help: they fire for the
installed sessions app whatever the middleware, as security.W010/W013.)
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.checks.security import base, csrf
from django.test.utils import override_settings
from django.utils.module_loading import import_string

DJANGO_MIDDLEWARE = (
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
)
MIDDLEWARE_CHECKS = (
    base.check_security_middleware,
    base.check_xframe_options_middleware,
    base.check_sts,
    base.check_sts_include_subdomains,
    base.check_sts_preload,
    base.check_content_type_nosniff,
    base.check_ssl_redirect,
    base.check_xframe_deny,
    base.check_referrer_policy,
    base.check_cross_origin_opener_policy,
    csrf.check_csrf_middleware,
    csrf.check_csrf_cookie_secure,
)


def _as_django_paths(middleware: list[str]) -> list[str]:
    paths = []
    for path in middleware:
        cls = import_string(path)
        for django_path in DJANGO_MIDDLEWARE:
            if isinstance(cls, type) and issubclass(cls, import_string(django_path)):
                path = django_path
        paths.append(path)
    return paths


@checks.register(checks.Tags.security, deploy=True)
def django_security_checks(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    with override_settings(MIDDLEWARE=_as_django_paths(settings.MIDDLEWARE)):
        return [message for check in MIDDLEWARE_CHECKS for message in check(app_configs)]
