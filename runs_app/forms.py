"""Forms of the runs app: they parse and validate what the pages post; the services decide."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django import forms
from django.http import Http404

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

STATUSES = ("Queued", "Preparing", "Running", "Completed", "Failed", "Canceling", "Canceled")
MAPPING_VALUE = re.compile(r"^\$\{(data|run\.outputs|run\.inputs)\.[^{}\s]+\}$")
MAX_EVALUATIONS = 8
MAX_CONCURRENCY = 512
MAX_LINE_TIMEOUT = 24 * 3600


@dataclass(frozen=True)
class FlowInput:
    """One input of a flow, as the mapping step shows it."""

    name: str
    type: str = "string"
    default: Any = None
    has_default: bool = False


@dataclass(frozen=True)
class FlowInterface:
    """What the submit wizard needs to know about one flow version: inputs, outputs, variants, connections."""

    inputs: tuple[FlowInput, ...] = ()
    outputs: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    connections: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default_factory=tuple)


@lru_cache(maxsize=128)
def flow_interface(snapshot_sha: str) -> FlowInterface:
    """Inputs, outputs, variants and connection names of a snapshot; cached because snapshots never change."""
    from flowengine import FlowValidationError, load_flow
    from flows_app.services import snapshot_materialize

    try:
        flow = load_flow(snapshot_materialize(snapshot_sha=snapshot_sha))
    except FlowValidationError as error:
        return FlowInterface(problems=tuple(str(problem) for problem in error.problems))
    inputs = tuple(
        FlowInput(
            name=spec.name,
            type=str(spec.type),
            default=spec.default,
            has_default=spec.default is not None,
        )
        for spec in flow.inputs.values()
    )
    variants = tuple(
        f"${{{node}.{variant}}}" for node, spec in flow.node_variants.items() for variant in spec.variants
    )
    names = {node.connection for node in flow.nodes if node.connection}
    for spec in flow.node_variants.values():
        names.update(v.node.connection for v in spec.variants.values() if v.node.connection)
    prompty_configuration = getattr(flow.prompty, "configuration", None) or {}
    if isinstance(prompty_configuration, Mapping) and prompty_configuration.get("connection"):
        names.add(str(prompty_configuration["connection"]))
    return FlowInterface(
        inputs=inputs, outputs=tuple(flow.outputs), variants=variants, connections=tuple(sorted(names))
    )


def suggest_mapping(
    inputs: Sequence[FlowInput], *, columns: Sequence[str], base_outputs: Sequence[str] = ()
) -> dict[str, str]:
    """Prompt flow's habit: an input named like a base run output or a data column maps to it, by name."""
    lowered_outputs = {name.lower(): name for name in base_outputs}
    lowered_columns = {name.lower(): name for name in columns}
    mapping: dict[str, str] = {}
    for spec in inputs:
        key = spec.name.lower()
        if key in lowered_outputs:
            mapping[spec.name] = f"${{run.outputs.{lowered_outputs[key]}}}"
        elif key in lowered_columns:
            mapping[spec.name] = f"${{data.{lowered_columns[key]}}}"
    return mapping


def parse_tags(text: str) -> dict[str, str]:
    """`key=value` pairs separated by commas or new lines; a bare word is a tag with an empty value."""
    tags: dict[str, str] = {}
    for part in re.split(r"[,\n]", text):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition("=")
        if not key.strip():
            raise forms.ValidationError(f"Tag “{part}” has no name before “=”.")
        tags[key.strip()] = value.strip()
    return tags


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class DatasetUploadForm(forms.Form):
    """A jsonl or csv file and an optional name (the file name without its extension by default)."""

    file = forms.FileField(
        label="Data file",
        help_text="JSON Lines (one object per line) or CSV with a header row.",
        widget=forms.ClearableFileInput(attrs={"accept": ".jsonl,.json,.csv"}),
    )
    name = forms.CharField(max_length=200, required=False, help_text="Defaults to the file name.")

    def clean_file(self) -> Any:
        """Only the two formats the runs read."""
        upload = self.cleaned_data["file"]
        if not upload.name.lower().endswith((".jsonl", ".json", ".csv")):
            raise forms.ValidationError(f"{upload.name}: expected a .jsonl or .csv file.")
        return upload

    def service_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `dataset_create` (minus the owner)."""
        upload = self.cleaned_data["file"]
        name = self.cleaned_data["name"].strip() or upload.name.rsplit(".", 1)[0]
        return {"name": name, "filename": upload.name, "data": upload.read()}


class RunFilterForm(forms.Form):
    """The run list's filters; they live in the URL so a filtered list can be bookmarked and shared."""

    q = forms.CharField(required=False, label="Search")
    flow = forms.TypedChoiceField(required=False, coerce=int, empty_value=None)
    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *[(s, s) for s in STATUSES]])
    author = forms.CharField(required=False)
    tag = forms.CharField(required=False)
    archived = forms.BooleanField(required=False, label="Archived")

    def __init__(self, *args: Any, flows: Sequence[Any] = (), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fields["flow"].choices = [("", "Any flow"), *[(f.pk, f.name) for f in flows]]

    def selector_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `run_list_for`; invalid filters are dropped rather than failing the page."""
        data = self.cleaned_data if self.is_valid() else {}
        return {
            "flow": data.get("flow") or None,
            "status": data.get("status") or None,
            "author": (data.get("author") or "").strip() or None,
            "tag": (data.get("tag") or "").strip() or None,
            "search": (data.get("q") or "").strip() or None,
            "archived": bool(data.get("archived")),
        }


class _MappingMixin:
    """Adds one `map__<input>` field per flow input, pre-filled with the suggestion."""

    fields: dict[str, forms.Field]

    def _add_mapping_fields(self, interface: FlowInterface, suggested: Mapping[str, str]) -> None:
        for spec in interface.inputs:
            default = "" if not spec.has_default else f"default: {spec.default!r}"
            self.fields[f"map__{spec.name}"] = forms.CharField(
                required=False,
                label=spec.name,
                initial=suggested.get(spec.name, ""),
                help_text=spec.type,
                widget=forms.TextInput(
                    attrs={
                        "placeholder": default or "${data.column}",
                        "spellcheck": "false",
                        "autocomplete": "off",
                        "list": "mapping-choices",
                        "class": "mono",
                    }
                ),
            )

    def mapping_fields(self) -> list[forms.BoundField]:
        """The bound mapping fields, in the flow's input order."""
        return [self[name] for name in self.fields if name.startswith("map__")]  # type: ignore[index]

    def _clean_mapping(self, cleaned: dict[str, Any], interface: FlowInterface) -> dict[str, str]:
        mapping: dict[str, str] = {}
        for spec in interface.inputs:
            value = (cleaned.get(f"map__{spec.name}") or "").strip()
            if not value:
                if not spec.has_default:
                    self.add_error(  # type: ignore[attr-defined]
                        f"map__{spec.name}",
                        f"Input “{spec.name}” has no default: map it to a column, e.g. ${{data.{spec.name}}}.",
                    )
                continue
            if value.startswith("${") and not MAPPING_VALUE.match(value):
                self.add_error(  # type: ignore[attr-defined]
                    f"map__{spec.name}",
                    f"“{value}” is not ${{data.x}}, ${{run.outputs.x}} or ${{run.inputs.x}}.",
                )
                continue
            mapping[spec.name] = value
        return mapping


def _version_choices(user: AbstractBaseUser, flow: Any) -> list[tuple[int, str]]:
    from flows_app.selectors import flow_versions_for

    return [
        (
            v.number,
            f"v{v.number} · {v.created_at:%Y-%m-%d %H:%M}{' · ' + v.message[:60] if v.message else ''}",
        )
        for v in flow_versions_for(user, flow.pk)
    ]


def _initial_from_run(run: Any) -> dict[str, Any]:
    """The wizard's fields filled in from an earlier run, for "clone with changes"."""
    tags = ", ".join(f"{k}={v}" if v else str(k) for k, v in (run.tags or {}).items())
    return {
        "flow": run.flow_id,
        "version": run.flow_version.number if run.flow_version is not None else None,
        "dataset": run.dataset_id,
        "variants": [run.variant] if run.variant else [],
        "concurrency": run.concurrency,
        "line_timeout": run.line_timeout,
        "tags": tags,
        "description": run.description,
    }


class EvaluationForm(_MappingMixin, forms.Form):
    """One evaluation flow to run on each new run once it has finished, with its own mapping."""

    index = 0
    flow = forms.TypedChoiceField(coerce=int, label="Evaluation flow")
    version = forms.TypedChoiceField(coerce=int, required=False, empty_value=None, label="Version")

    def __init__(
        self,
        *args: Any,
        user: AbstractBaseUser,
        flows: Sequence[Any],
        columns: Sequence[str],
        base_outputs: Sequence[str],
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.user = user
        self.fields["flow"].choices = [("", "Choose a flow"), *[(f.pk, f.name) for f in flows]]
        self.flow_version: Any = None
        self.interface = FlowInterface()
        flow_pk = _int_or_none(self._raw("flow"))
        if flow_pk is None:
            return
        from flows_app.selectors import flow_get_for, flow_version_get_for

        try:
            flow = flow_get_for(user, flow_pk)
            self.fields["version"].choices = [("", "Latest"), *_version_choices(user, flow)]
            self.flow_version = flow_version_get_for(user, flow_pk, _int_or_none(self._raw("version")))
        except Http404:
            return
        self.interface = flow_interface(self.flow_version.snapshot_id)
        self._add_mapping_fields(
            self.interface, suggest_mapping(self.interface.inputs, columns=columns, base_outputs=base_outputs)
        )

    def _raw(self, name: str) -> Any:
        key = self.add_prefix(name)
        if self.is_bound:
            return self.data.get(key)
        return self.initial.get(name)

    def clean(self) -> dict[str, Any]:
        """The mapping must cover every input without a default."""
        cleaned = super().clean() or {}
        if self.flow_version is None:
            if cleaned.get("flow"):
                self.add_error("flow", "This flow no longer exists or is not shared with you.")
            return cleaned
        if self.interface.problems:
            self.add_error("flow", "The evaluation flow does not load: " + "; ".join(self.interface.problems))
        cleaned["column_mapping"] = self._clean_mapping(cleaned, self.interface)
        return cleaned


class RunSubmitForm(_MappingMixin, forms.Form):
    """The batch run wizard: flow and version, variants, data and mapping, settings, evaluations.

    The form is rebuilt from what is posted (or the query string while the user picks), so the mapping,
    variants and connection rows always belong to the flow version currently chosen.
    """

    flow = forms.TypedChoiceField(coerce=int, label="Flow")
    version = forms.TypedChoiceField(coerce=int, required=False, empty_value=None, label="Version")
    variants = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="One run per variant checked; none checked runs the default variants.",
    )
    dataset = forms.TypedChoiceField(coerce=int, label="Dataset")
    base_run = forms.UUIDField(required=False, widget=forms.HiddenInput)
    name = forms.CharField(
        max_length=200, required=False, help_text="Unique; a name is made up from the flow when blank."
    )
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    tags = forms.CharField(
        required=False, help_text="key=value pairs, separated by commas.", widget=forms.TextInput()
    )
    concurrency = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_CONCURRENCY,
        help_text="Lines in flight at once per worker; blank uses the studio default.",
    )
    line_timeout = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_LINE_TIMEOUT,
        label="Line timeout (seconds)",
        help_text="A line still running after this is failed; blank uses the default.",
    )
    evaluations = forms.CharField(required=False, widget=forms.HiddenInput)

    def __init__(
        self,
        data: Any = None,
        *,
        user: AbstractBaseUser,
        query: Mapping[str, Any] | None = None,
        base_run: Any = None,
        clone_from: Any = None,
        **kw: Any,
    ) -> None:
        from flows_app.selectors import connection_list_for, flow_get_for, flow_list_for, flow_version_get_for
        from runs_app.selectors import dataset_list_for

        self.user = user
        self.base_run = base_run
        source: Mapping[str, Any] = data if data is not None else (query or {})
        initial = dict(kw.pop("initial", {}) or {})
        if clone_from is not None:
            initial.update(_initial_from_run(clone_from))
        if data is None:
            initial.update({k: v for k, v in (query or {}).items() if k in {"flow", "version", "dataset"}})
        if base_run is not None:
            initial.setdefault("dataset", base_run.dataset_id)
            initial["base_run"] = base_run.pk
        super().__init__(data, initial=initial, **kw)

        self.flows = list(flow_list_for(user))
        self.datasets = list(dataset_list_for(user))
        self.connections = list(connection_list_for(user))
        self.fields["flow"].choices = [("", "Choose a flow"), *[(f.pk, f.name) for f in self.flows]]
        self.fields["dataset"].choices = [("", "Choose a dataset"), *[(d.pk, d.name) for d in self.datasets]]

        self.flow_version: Any = None
        self.interface = FlowInterface()
        flow_pk = _int_or_none(source.get("flow", initial.get("flow")))
        if flow_pk is not None:
            try:
                flow = flow_get_for(user, flow_pk)
                self.fields["version"].choices = [("", "Latest"), *_version_choices(user, flow)]
                version = _int_or_none(source.get("version", initial.get("version")))
                self.flow_version = flow_version_get_for(user, flow_pk, version)
            except Http404:
                self.flow_version = None
        if self.flow_version is not None:
            self.interface = flow_interface(self.flow_version.snapshot_id)
        self.fields["variants"].choices = [(v, v) for v in self.interface.variants]

        dataset_pk = _int_or_none(source.get("dataset", initial.get("dataset")))
        self.chosen_dataset = next((d for d in self.datasets if d.pk == dataset_pk), None)
        self.columns: list[str] = list(self.chosen_dataset.columns) if self.chosen_dataset is not None else []
        self.base_outputs: list[str] = []
        if base_run is not None and base_run.flow_version is not None:
            self.base_outputs = list(flow_interface(base_run.snapshot_id).outputs)
        suggested = suggest_mapping(
            self.interface.inputs, columns=self.columns, base_outputs=self.base_outputs
        )
        if clone_from is not None and data is None:
            suggested = {**suggested, **(clone_from.column_mapping or {})}
        self._add_mapping_fields(self.interface, suggested)

        names = [("", "As in the flow")] + [(c.name, c.name) for c in self.connections]
        overrides = (clone_from.connections or {}) if clone_from is not None else {}
        for name in self.interface.connections:
            self.fields[f"conn__{name}"] = forms.ChoiceField(
                required=False, choices=names, label=name, initial=overrides.get(name, "")
            )

        self.source = source
        indexes = self._evaluation_indexes(source)
        self.evaluation_forms = [self.evaluation_form(index) for index in indexes]

    @staticmethod
    def _evaluation_indexes(source: Mapping[str, Any]) -> list[int]:
        raw = str(source.get("evaluations") or "")
        indexes = [int(part) for part in raw.split(",") if part.strip().isdigit()]
        return sorted(set(indexes))[:MAX_EVALUATIONS]

    @property
    def evaluation_indexes(self) -> str:
        """The indexes of the evaluation steps on the page, as the hidden `evaluations` field carries them."""
        return ",".join(str(e.index) for e in self.evaluation_forms)

    def evaluation_form(self, index: int) -> EvaluationForm:
        """The evaluation step `index`, bound when posted, else filled in from the query string."""
        prefix = f"ev{index}"
        initial = (
            {}
            if self.is_bound
            else {"flow": self.source.get(f"{prefix}-flow"), "version": self.source.get(f"{prefix}-version")}
        )
        form = EvaluationForm(
            self.data if self.is_bound else None,
            prefix=prefix,
            initial=initial,
            user=self.user,
            flows=self.flows,
            columns=self.columns,
            base_outputs=self.interface.outputs,
        )
        form.index = index
        return form

    def add_evaluation(self) -> EvaluationForm | None:
        """A new, empty evaluation step after the existing ones (None once there are MAX_EVALUATIONS)."""
        if len(self.evaluation_forms) >= MAX_EVALUATIONS:
            return None
        index = max((e.index for e in self.evaluation_forms), default=-1) + 1
        form = self.evaluation_form(index)
        self.evaluation_forms.append(form)
        return form

    def error_field(self, name: str | None) -> str | None:
        """The form field a service error's `field` refers to, or None for an error of the whole form."""
        name = {"data": "dataset", "line_timeout": "line_timeout", "variant": "variants"}.get(
            name or "", name
        )
        return name if name in self.fields else None

    def connection_fields(self) -> list[forms.BoundField]:
        """The bound connection override fields, one per connection the flow uses."""
        return [self[name] for name in self.fields if name.startswith("conn__")]

    def mapping_choices(self) -> list[str]:
        """Every `${...}` reference the mapping inputs can offer as completions."""
        choices = [f"${{data.{c}}}" for c in self.columns]
        choices += [f"${{run.outputs.{o}}}" for o in self.base_outputs]
        if self.base_run is not None:
            choices += [f"${{run.inputs.{i.name}}}" for i in flow_interface(self.base_run.snapshot_id).inputs]
        return choices

    def clean_tags(self) -> dict[str, str]:
        """Tags as a dict."""
        return parse_tags(self.cleaned_data.get("tags") or "")

    def clean(self) -> dict[str, Any]:
        """Cross-field checks: a flow version that loads, a dataset of the user, a complete mapping."""
        cleaned = super().clean() or {}
        if cleaned.get("flow") is not None and self.flow_version is None:
            self.add_error("flow", "This flow no longer exists or is not shared with you.")
        if self.interface.problems:
            self.add_error("flow", "The flow does not load: " + "; ".join(self.interface.problems))
        if cleaned.get("dataset") is not None and self.chosen_dataset is None:
            self.add_error("dataset", "This dataset no longer exists or is not shared with you.")
        cleaned["column_mapping"] = self._clean_mapping(cleaned, self.interface)
        cleaned["connections"] = {
            name: cleaned[f"conn__{name}"]
            for name in self.interface.connections
            if cleaned.get(f"conn__{name}")
        }
        for evaluation in self.evaluation_forms:
            if not evaluation.is_valid():
                self.add_error(None, "An evaluation step needs attention: see its mapping below.")
                break
        return cleaned

    def service_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `run_submit` (minus the user), once the form is valid."""
        data = self.cleaned_data
        return {
            "flow_version": self.flow_version,
            "dataset": self.chosen_dataset,
            "column_mapping": data["column_mapping"],
            "variants": list(data.get("variants") or []),
            "base_run": self.base_run,
            "name": data.get("name") or None,
            "connections": data["connections"],
            "concurrency": data.get("concurrency"),
            "line_timeout": data.get("line_timeout"),
            "tags": data.get("tags") or {},
            "description": data.get("description") or "",
            "evaluations": [
                {"flow_version": e.flow_version, "column_mapping": e.cleaned_data["column_mapping"]}
                for e in self.evaluation_forms
            ],
        }


class RunYamlForm(forms.Form):
    """Submit from prompt flow's run.yml, optionally with the data file it names."""

    run_yml = forms.FileField(
        label="run.yml", widget=forms.ClearableFileInput(attrs={"accept": ".yml,.yaml"})
    )
    data = forms.FileField(
        required=False,
        label="Data file",
        help_text="The file named by `data:` in the YAML, unless it names a dataset already in the studio.",
    )

    def service_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `run_create_from_yaml` (minus the user)."""
        files: dict[str, bytes] = {}
        upload = self.cleaned_data.get("data")
        if upload is not None:
            files[upload.name] = upload.read()
        return {"run_yml": self.cleaned_data["run_yml"].read(), "files": files}


class LineSelectionForm(forms.Form):
    """Line numbers ticked in the outputs table, for a rerun of just those lines."""

    lines = forms.CharField(required=False)

    def __init__(self, data: Any, *, total: int) -> None:
        super().__init__(data)
        self.total = total
        self.raw_lines = data.getlist("lines") if hasattr(data, "getlist") else []

    def clean(self) -> dict[str, Any]:
        """Every value a line number of the run; at least one."""
        cleaned = super().clean() or {}
        numbers: set[int] = set()
        for value in self.raw_lines:
            number = _int_or_none(value)
            if number is None or not 0 <= number < self.total:
                raise forms.ValidationError(f"“{value}” is not a line of this run (0 to {self.total - 1}).")
            numbers.add(number)
        if not numbers:
            raise forms.ValidationError("Select at least one line to run again.")
        cleaned["lines"] = sorted(numbers)
        return cleaned


# --- the deploy wizard -------------------------------------------------------------------------------------


class DeployForm(forms.Form):
    """The deploy wizard: basic settings, endpoint auth, outputs and connections (the service validates)."""

    endpoint_mode = forms.ChoiceField(
        label="Endpoint",
        choices=[("new", "New endpoint"), ("existing", "Existing endpoint")],
        initial="new",
        widget=forms.RadioSelect,
    )
    endpoint_name = forms.CharField(
        label="Endpoint name",
        required=False,
        max_length=32,
        help_text="Part of the scoring URL /endpoints/&lt;name&gt;/score: 3 to 32 lower-case letters, digits, '-'.",
    )
    endpoint = forms.ChoiceField(label="Existing endpoint", required=False, choices=())
    deployment = forms.CharField(
        label="Deployment name",
        max_length=32,
        initial="blue",
        help_text="Deployments of one endpoint split its traffic (blue / green).",
    )
    instance_count = forms.IntegerField(
        label="Warm runner processes",
        min_value=1,
        max_value=8,
        initial=1,
        help_text="Each runner serves many requests at once; more of them spread CPU-bound flows.",
    )
    auth_mode = forms.ChoiceField(
        label="Authentication",
        choices=[("key", "Key: a primary and a secondary key, shown once")],
        initial="key",
        widget=forms.RadioSelect,
    )
    outputs = forms.MultipleChoiceField(
        label="Outputs the endpoint returns", required=False, widget=forms.CheckboxSelectMultiple
    )

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        endpoints: Sequence[str],
        outputs: Sequence[str],
        connections_used: Sequence[str],
        connections_available: Sequence[str],
        chosen_endpoint: str = "",
    ) -> None:
        initial: dict[str, Any] = {"outputs": list(outputs)}
        if chosen_endpoint and chosen_endpoint in endpoints:
            initial.update(endpoint_mode="existing", endpoint=chosen_endpoint)
        super().__init__(data, initial=initial)
        self.fields["endpoint"].choices = [("", "— choose —"), *((e, e) for e in endpoints)]
        self.fields["outputs"].choices = [(o, o) for o in outputs]
        self.has_endpoints = bool(endpoints)
        choices = [("", "— choose one of your connections —"), *((c, c) for c in connections_available)]
        for name in connections_used:
            self.fields[f"conn__{name}"] = forms.ChoiceField(
                label=name,
                choices=choices,
                initial=name if name in connections_available else "",
                error_messages={"required": f"Pick the connection that serves '{name}'."},
            )

    def clean(self) -> dict[str, Any]:
        """The endpoint name comes from the field of the chosen mode."""
        cleaned = super().clean()
        mode = cleaned.get("endpoint_mode")
        if mode == "new" and not cleaned.get("endpoint_name"):
            self.add_error("endpoint_name", "Name the new endpoint.")
        if mode == "existing" and not cleaned.get("endpoint"):
            self.add_error("endpoint", "Choose one of your endpoints.")
        if not cleaned.get("outputs") and self.fields["outputs"].choices:
            self.add_error("outputs", "Choose at least one output the endpoint returns.")
        return cleaned

    def connection_fields(self) -> list[forms.BoundField]:
        """The bound connection fields, one per connection the flow uses."""
        return [self[name] for name in self.fields if name.startswith("conn__")]

    def error_field(self, name: str | None) -> str | None:
        """The form field a service error's `field` refers to (None: an error of the whole form)."""
        if name == "endpoint":
            name = "endpoint_name" if self.cleaned_data.get("endpoint_mode") == "new" else "endpoint"
        if name == "connections":
            fields = self.connection_fields()
            return fields[0].name if fields else None
        return name if name in self.fields else None

    def service_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `services.deployment_create`."""
        data = self.cleaned_data
        new = data["endpoint_mode"] == "new"
        return {
            "endpoint": data["endpoint_name"] if new else data["endpoint"],
            "new_endpoint": new,
            "deployment": data["deployment"],
            "instance_count": data["instance_count"],
            "outputs": list(data.get("outputs") or []) if self.fields["outputs"].choices else None,
            "connections": {
                name.removeprefix("conn__"): data[name] for name in self.fields if name.startswith("conn__")
            },
        }


class TrafficForm(forms.Form):
    """The traffic split of an endpoint's deployments: one whole percent per deployment."""

    def __init__(self, data: Mapping[str, Any] | None = None, *, deployments: Sequence[Any]) -> None:
        super().__init__(data)
        for deployment in deployments:
            self.fields[f"traffic__{deployment.name}"] = forms.IntegerField(
                label=deployment.name, min_value=0, max_value=100, initial=deployment.traffic
            )

    def traffic(self) -> dict[str, int]:
        """Deployment name -> percent."""
        return {name.removeprefix("traffic__"): value for name, value in self.cleaned_data.items()}
