from django.urls import path

from web import views

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("login/", views.login_view, name="login"),
    path("logout/", views.logout_view, name="logout"),
]
