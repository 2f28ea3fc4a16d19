from django.urls import path, register_converter

from chat.api import views
from chat.api.converters import IdConverter

register_converter(IdConverter, "id")

urlpatterns = [
    path("messages/", views.MessageListView.as_view(), name="message-list"),
    path("messages/create/", views.MessageCreateView.as_view(), name="message-create"),
    path("messages/<id:message_id>/", views.MessageDetailView.as_view(), name="message-detail"),
    path(
        "messages/<id:message_id>/stream/",
        views.MessageStreamView.as_view(),
        name="message-stream",
    ),
    path(
        "messages/<id:message_id>/regenerate/",
        views.MessageRegenerateView.as_view(),
        name="message-regenerate",
    ),
    path(
        "messages/<id:message_id>/cancel/",
        views.MessageCancelView.as_view(),
        name="message-cancel",
    ),
    path("conversations/", views.ConversationListView.as_view(), name="conversation-list"),
    path(
        "conversations/<id:conversation_id>/",
        views.ConversationDetailView.as_view(),
        name="conversation-detail",
    ),
    path(
        "conversations/<id:conversation_id>/messages/",
        views.ConversationMessagesView.as_view(),
        name="conversation-messages",
    ),
    path(
        "conversations/<id:conversation_id>/export/",
        views.ConversationExportView.as_view(),
        name="conversation-export",
    ),
    path("models/", views.ModelListView.as_view(), name="model-list"),
    path("usage/", views.UsageView.as_view(), name="usage"),
]
