"""Pages of the flows app: thin views over the selectors and services."""

from __future__ import annotations

from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from flows_app.forms import ConnectionForm
from flows_app.selectors import connection_get_for, connection_list_for
from flows_app.services import connection_create, connection_delete, connection_test, connection_update

LIST = "flows_app/connections/list.html"
DETAIL = "flows_app/connections/detail.html"
FORM = "flows_app/connections/form.html"
DELETE = "flows_app/connections/delete.html"


@login_required
@require_GET
def connection_list(request: HttpRequest) -> HttpResponse:
    """All connections the user can use; htmx gets just the rows for the name filter."""
    query = request.GET.get("q", "").strip()
    connections = connection_list_for(request.user)
    if query:
        connections = connections.filter(name__icontains=query)
    template = f"{LIST}#rows" if request.htmx else LIST
    return render(request, template, {"connections": connections, "q": query})


@login_required
@require_GET
def connection_detail(request: HttpRequest, pk: UUID) -> HttpResponse:
    """One connection, secrets masked; the owner also gets edit and delete."""
    connection = connection_get_for(request.user, pk=pk)
    return render(
        request, DETAIL, {"connection": connection, "can_edit": connection.owner_id == request.user.pk}
    )


def _save_form(request: HttpRequest, form: ConnectionForm) -> HttpResponse:
    if request.method == "POST" and form.is_valid():
        try:
            if form.connection is None:
                connection = connection_create(owner=request.user, **form.service_kwargs())
            else:
                connection = connection_update(
                    connection=form.connection, by=request.user, **form.service_kwargs()
                )
        except ValidationError as error:
            form.add_service_errors(error)
        else:
            messages.success(request, f"Connection '{connection.name}' saved.")
            url = reverse("connections:detail", kwargs={"pk": connection.pk})
            return HttpResponseClientRedirect(url) if request.htmx else redirect(url)
    template = f"{FORM}#form" if request.htmx else FORM
    # 422 on errors: base.html tells htmx to swap it in like a success.
    status = 422 if request.method == "POST" else 200
    return render(request, template, {"form": form, "connection": form.connection}, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def connection_new(request: HttpRequest) -> HttpResponse:
    """Create a connection."""
    return _save_form(request, ConnectionForm(request.POST or None, user=request.user))


@login_required
@require_http_methods(["GET", "POST"])
def connection_edit(request: HttpRequest, pk: UUID) -> HttpResponse:
    """Edit a connection (owner only); a blank secret keeps the stored value."""
    connection = connection_get_for(request.user, pk=pk, editable=True)
    return _save_form(request, ConnectionForm(request.POST or None, user=request.user, connection=connection))


@login_required
@require_http_methods(["GET", "POST"])
def connection_delete_view(request: HttpRequest, pk: UUID) -> HttpResponse:
    """Confirm (GET) and delete (POST) a connection (owner only)."""
    connection = connection_get_for(request.user, pk=pk, editable=True)
    if request.method == "GET":
        return render(request, DELETE, {"connection": connection})
    connection_delete(connection=connection, by=request.user)
    messages.success(request, f"Connection '{connection.name}' deleted.")
    url = reverse("connections:list")
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


@login_required
@require_POST
def connection_test_view(request: HttpRequest, pk: UUID) -> HttpResponse:
    """Make one real call with the connection; htmx swaps in the outcome, others get the detail page."""
    connection = connection_get_for(request.user, pk=pk)
    result = connection_test(connection=connection)
    context = {"connection": connection, "can_edit": connection.owner_id == request.user.pk, "result": result}
    return render(request, f"{DETAIL}#test-result" if request.htmx else DETAIL, context)
