"""The web chat page and its login/logout pages.

The page is a client of the public JSON API (/api/...), like any other: the view only serves the
HTML shell with what the script needs to start (in a `json_script` block, never inline code).
Every response of these views carries a strict Content-Security-Policy: scripts, styles and
connections from this origin only, no inline script or style, no plugins, no framing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponseBase
from django.shortcuts import render, resolve_url
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import ensure_csrf_cookie

from chat.api.errors import not_found_view

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

View = Callable[..., HttpResponseBase]
API_ROOT = "/api/"  # where config/urls.py mounts chat.api.urls


def web_page(view: View) -> View:
    """A page of the web UI: answered only while CHAT_WEB_UI is on (otherwise the API's JSON
    404, as for any unknown URL), always with the Content-Security-Policy header."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not settings.CHAT_WEB_UI:
            return not_found_view(request)
        response = view(request, *args, **kwargs)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response

    return wrapper


def anonymous_allowed() -> bool:
    """Whether the API serves requests without a logged-in user (CHAT_ALLOW_ANONYMOUS)."""
    return bool(settings.CHAT_ALLOW_ANONYMOUS)


def _page_config(request: HttpRequest) -> dict[str, Any]:
    """What app.js needs to start, rendered with json_script (data, not code)."""
    user = request.user
    authenticated = bool(user.is_authenticated)
    return {
        "apiRoot": API_ROOT,
        "user": {
            "username": user.get_username() if authenticated else "",
            "authenticated": authenticated,
        },
        "anonymousAllowed": anonymous_allowed(),
        "loginUrl": resolve_url(settings.LOGIN_URL),
        # The allow-list as this process knows it; GET /api/models/ is asked first.
        "models": list(settings.OPENAI_ALLOWED_MODELS),
        "defaultModel": settings.OPENAI_MODEL,
        "maxPromptChars": settings.CHAT_MAX_PROMPT_CHARS,
    }


@web_page
@never_cache
@ensure_csrf_cookie
def chat_page(request: HttpRequest) -> HttpResponseBase:
    if not request.user.is_authenticated and not anonymous_allowed():
        return redirect_to_login(request.get_full_path(), resolve_url(settings.LOGIN_URL))
    context = {
        "config": _page_config(request),
        "logout_url": reverse("logout"),
        "anonymous_allowed": anonymous_allowed(),
    }
    return render(request, "web/chat.html", context)


login_view = web_page(
    auth_views.LoginView.as_view(
        template_name="web/login.html",
        redirect_authenticated_user=True,
        extra_context={"anonymous_allowed": anonymous_allowed},
    )
)

# Django's LogoutView answers POST only (a CSRF-protected form), then redirects to
# LOGOUT_REDIRECT_URL.
logout_view = web_page(auth_views.LogoutView.as_view())
