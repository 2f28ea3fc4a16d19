from django.urls import path

from chat.api import views

urlpatterns = [
    path("messages/", views.MessageListView.as_view(), name="message-list"),
    path("messages/create/", views.MessageCreateView.as_view(), name="message-create"),
    path("messages/<int:message_id>/", views.MessageDetailView.as_view(), name="message-detail"),
    path(
        "messages/<int:message_id>/stream/",
        views.MessageStreamView.as_view(),
        name="message-stream",
    ),
]
