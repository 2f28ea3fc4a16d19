from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from chat.api.views import LivenessView, ReadinessView, metrics_view

urlpatterns = [
    path("api/", include("chat.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("admin/", admin.site.urls),
    path("healthz", LivenessView.as_view(), name="healthz"),
    path("readyz", ReadinessView.as_view(), name="readyz"),
    path("metrics", metrics_view, name="metrics"),
    # The web chat page at / (CHAT_WEB_UI), with /login/ and /logout/.
    path("", include("web.urls")),
]

handler400 = "chat.api.errors.bad_request_view"
handler403 = "chat.api.errors.permission_denied_view"
handler404 = "chat.api.errors.not_found_view"
handler500 = "chat.api.errors.server_error_view"
