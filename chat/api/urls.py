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
    path(
        "messages/<int:message_id>/regenerate/",
        views.MessageRegenerateView.as_view(),
        name="message-regenerate",
    ),
    path("conversations/", views.ConversationListView.as_view(), name="conversation-list"),
    path(
        "conversations/<int:conversation_id>/",
        views.ConversationDetailView.as_view(),
        name="conversation-detail",
    ),
    path(
        "conversations/<int:conversation_id>/messages/",
        views.ConversationMessagesView.as_view(),
        name="conversation-messages",
    ),
    path(
        "conversations/<int:conversation_id>/export/",
        views.ConversationExportView.as_view(),
        name="conversation-export",
    ),
]
