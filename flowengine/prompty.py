"""`.prompty` files: load (front matter + Jinja2 body, problems with file and line), run, and the user-facing Prompty."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from flowengine import llm
from flowengine.connections import Connection, get_connection
from flowengine.templates import (
    build_messages,
    preprocess_template_string,
    render_template,
    sandbox_environment,
)
from flowengine.tools.llm_tool import (
    LLMNodeError,
    LLMNodeResult,
    call_model,
    process_function_call,
    process_tool_choice,
    validate_functions,
    validate_tools,
)

# prompt flow's split: the front matter runs from the first `---` line to the LAST `---` line (greedy).
_PROMPTY_RE = re.compile(r"-{3,}\n(.*)-{3,}\n(.*)", re.DOTALL)
_REFERENCE_RE = re.compile(r"\$\{(\w+):(.*)\}")
_ENV_ONLY_RE = re.compile(r"^\$\{env:(.*)\}$")


class PromptyError(Exception):
    """Running a prompty failed for a reason its author can fix (inputs, outputs, configuration)."""


@dataclass(frozen=True)
class OpenAIModelConfiguration:
    """prompt flow's OpenAIModelConfiguration: an OpenAI model plus either credentials or a connection name."""

    model: str
    base_url: str | None = None
    api_key: str | None = None
    organization: str | None = None
    connection: str | None = None

    def __post_init__(self) -> None:
        if any([self.base_url, self.api_key, self.organization]) and self.connection:
            raise PromptyError("Cannot configure model config and connection at the same time.")

    @property
    def _type(self) -> str:
        return "open_ai"

    @classmethod
    def from_connection(cls, connection: Any, model: str) -> OpenAIModelConfiguration:
        """A configuration with the credentials of an OpenAI connection."""
        return cls(
            model=model,
            base_url=getattr(connection, "base_url", None),
            api_key=getattr(connection, "api_key", None),
            organization=getattr(connection, "organization", None),
        )


@dataclass(frozen=True)
class AzureOpenAIModelConfiguration:
    """prompt flow's AzureOpenAIModelConfiguration: a deployment plus either credentials or a connection name."""

    azure_deployment: str
    azure_endpoint: str | None = None
    api_version: str | None = None
    api_key: str | None = None
    connection: str | None = None

    def __post_init__(self) -> None:
        if any([self.azure_endpoint, self.api_key, self.api_version]) and self.connection:
            raise PromptyError("Cannot configure model config and connection at the same time.")

    @property
    def _type(self) -> str:
        return "azure_open_ai"

    @classmethod
    def from_connection(cls, connection: Any, azure_deployment: str) -> AzureOpenAIModelConfiguration:
        """A configuration with the credentials of an Azure OpenAI connection."""
        return cls(
            azure_deployment=azure_deployment,
            azure_endpoint=getattr(connection, "api_base", None),
            api_version=getattr(connection, "api_version", None),
            api_key=getattr(connection, "api_key", None),
        )


ModelConfiguration = OpenAIModelConfiguration | AzureOpenAIModelConfiguration


@dataclass(frozen=True)
class PromptySpec:
    """A loaded .prompty: its front matter fields, the template body and where the body starts."""

    path: Path
    name: str
    description: str
    api: str
    configuration: Mapping[str, Any] | ModelConfiguration
    parameters: Mapping[str, Any]
    response: str
    inputs: Mapping[str, Mapping[str, Any]]
    outputs: Mapping[str, Any]
    sample: Any
    template: str
    template_line: int
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> str:
        """The file name, for messages."""
        return self.path.name

    @property
    def model_name(self) -> str | None:
        """The model (OpenAI) or deployment (Azure) the configuration names."""
        cfg = self.configuration
        if isinstance(cfg, OpenAIModelConfiguration):
            return cfg.model
        if isinstance(cfg, AzureOpenAIModelConfiguration):
            return cfg.azure_deployment
        return cfg.get("azure_deployment") or cfg.get("model")

    @property
    def connection_name(self) -> str | None:
        """The connection the configuration refers to by name, if any."""
        cfg = self.configuration
        name = cfg.connection if not isinstance(cfg, Mapping) else cfg.get("connection")
        return name if isinstance(name, str) and name else None

    def input_signature(self) -> dict[str, Mapping[str, Any]]:
        """Declared inputs, else inputs inferred from the sample (as prompt flow does)."""
        if self.inputs:
            return dict(self.inputs)
        sample = _sample_inputs(self.sample, self.path.parent)
        return {k: {"type": _value_type(v)} for k, v in sample.items()}


# -- loading --------------------------------------------------------------------------------------------


def _problem(message: str, file: str, line: int | None = None, field_: str | None = None) -> Any:
    from flowengine.model import Problem

    return Problem(message=message, file=file, line=line, field=field_)


def _raise(problems: list[Any]) -> None:
    from flowengine.model import FlowValidationError

    raise FlowValidationError(problems)


def update_dict_recursively(origin: Mapping[str, Any], overwrite: Mapping[str, Any]) -> dict[str, Any]:
    """prompt flow's merge: dicts in `overwrite` merge into `origin`, other values replace."""
    updated: dict[str, Any] = {}
    for k, v in overwrite.items():
        if isinstance(v, dict):
            base = origin.get(k, {})
            updated[k] = update_dict_recursively(base if isinstance(base, Mapping) else {}, v)
        else:
            updated[k] = v
    for k, v in origin.items():
        if k not in updated:
            updated[k] = v
    return updated


def _resolve_reference(value: str, base: Path, where: str, problems: list[tuple[str, str]]) -> Any:
    match = _REFERENCE_RE.match(value)
    if not match:
        return value
    kind, target = match.groups()
    if kind == "env":
        return os.environ.get(target, value)
    if kind == "file":
        path = Path(target) if Path(target).is_absolute() else base / target
        if not path.is_file():
            problems.append((where, f"Cannot find the reference file {target}."))
            return value
        text = path.read_text(encoding="utf-8")
        suffix = path.suffix.lower()
        try:
            if suffix == ".json":
                return json.loads(text)
            if suffix in (".yml", ".yaml"):
                import yaml

                return yaml.safe_load(text)
        except (ValueError, Exception) as exc:  # a broken referenced file is the author's to fix
            problems.append((where, f"cannot parse the reference file {target}: {exc}"))
            return value
        return text
    return value


def resolve_references(
    origin: Any, base: Path, where: str = "", problems: list[tuple[str, str]] | None = None
) -> Any:
    """Resolve `${env:VAR}` (unset: kept as is) and `${file:path}` (JSON/YAML parsed, else text) everywhere."""
    problems = problems if problems is not None else []
    if isinstance(origin, str):
        return _resolve_reference(origin, base, where, problems)
    if isinstance(origin, list):
        return [
            resolve_references(v, base, f"{where}.{i}" if where else str(i), problems)
            for i, v in enumerate(origin)
        ]
    if isinstance(origin, dict):
        return {
            k: resolve_references(v, base, f"{where}.{k}" if where else str(k), problems)
            for k, v in origin.items()
        }
    return origin


def _sample_inputs(sample: Any, base: Path) -> dict[str, Any]:
    if not sample:
        return {}
    if isinstance(sample, Mapping):
        return dict(sample)
    if isinstance(sample, str) and sample.endswith(".json"):
        name = sample[len("file:") :] if sample.startswith("file:") else sample
        path = Path(name) if Path(name).is_absolute() else base / name
        if not path.is_file():
            raise PromptyError(f"Cannot find sample file {name}.")
        return json.loads(path.read_text(encoding="utf-8"))
    raise PromptyError("Only dict and json file are supported as sample in prompty.")


def _value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "string"


def _load_front_matter(text: str, file: str, line_offset: int) -> tuple[Any, dict[str, tuple[int, int]]]:
    try:
        from flowengine.loader import load_yaml_text
    except ImportError:  # the loader is optional for prompty use outside flows
        import yaml

        try:
            return yaml.safe_load(text), {}
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            _raise(
                [
                    _problem(
                        f"invalid YAML: {exc.problem}", file, (mark.line + 1 + line_offset) if mark else None
                    )
                ]
            )
            raise
    return load_yaml_text(text, file, line_offset=line_offset)


def load_prompty(
    path: str | Path, *, model: Mapping[str, Any] | None = None, **overrides: Any
) -> PromptySpec:
    """Read a .prompty file; `model` / `overrides` merge into its front matter as Prompty.load does.

    Raises FlowValidationError with every problem found, each with the file and line.
    """
    path = Path(path)
    file = path.name
    try:
        # Text mode turns CRLF into LF, which the front-matter pattern expects.
        content = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        _raise([_problem(f"Source {path} does not exist", file)])
    except (OSError, UnicodeDecodeError) as exc:
        _raise([_problem(f"cannot read the file: {exc}", file)])
    match = _PROMPTY_RE.search(content)
    if not match:
        _raise(
            [
                _problem(
                    "Illegal formatting of prompty. The prompt file is in markdown format and can be divided into "
                    "two parts, the first part is in YAML format and contains connection and model information. "
                    "The second part is the prompt template.",
                    file,
                    1,
                )
            ]
        )
    front_line = content.count("\n", 0, match.start(1)) + 1
    template_line = content.count("\n", 0, match.start(2)) + 1
    data, locations = _load_front_matter(match.group(1), file, front_line - 1)
    template = match.group(2)
    if data is None:
        data = {}
    problems: list[Any] = []

    def line_of(key: str) -> int | None:
        while key:
            if key in locations:
                return locations[key][0]
            key = key.rpartition(".")[0]
        return front_line

    if not isinstance(data, Mapping):
        _raise([_problem("the front matter must be a YAML mapping", file, front_line)])
    ref_problems: list[tuple[str, str]] = []
    configs = resolve_references(dict(data), path.parent, "", ref_problems)
    configs = update_dict_recursively(
        configs, resolve_references(dict(overrides), path.parent, "", ref_problems)
    )
    model_data = configs.get("model") or {}
    if not isinstance(model_data, Mapping):
        problems.append(_problem("'model' must be a mapping", file, line_of("model"), "model"))
        model_data = {}
    model_data = update_dict_recursively(
        model_data, resolve_references(dict(model or {}), path.parent, "", ref_problems)
    )
    configs["model"] = model_data
    for where, message in ref_problems:
        problems.append(_problem(message, file, line_of(where), where))

    api = model_data.get("api", "chat")
    if api not in ("chat", "completion"):
        problems.append(
            _problem(
                f"model.api must be 'chat' or 'completion', got {api!r}",
                file,
                line_of("model.api"),
                "model.api",
            )
        )
    response = model_data.get("response", "first")
    if response not in ("first", "all"):
        problems.append(
            _problem(
                f"model.response must be 'first' or 'all', got {response!r}",
                file,
                line_of("model.response"),
                "model.response",
            )
        )
    parameters = model_data.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        problems.append(
            _problem(
                "model.parameters must be a mapping", file, line_of("model.parameters"), "model.parameters"
            )
        )
        parameters = {}
    configuration = model_data.get("configuration") or {}
    if isinstance(configuration, Mapping):
        configuration = dict(configuration)
        ctype = configuration.get("type")
        if configuration and ctype not in (
            "openai",
            "azure_openai",
            "open_ai",
            "azure_open_ai",
            "OpenAI",
            "AzureOpenAI",
        ):
            problems.append(
                _problem(
                    f"model.configuration.type must be 'openai' or 'azure_openai', got {ctype!r}",
                    file,
                    line_of("model.configuration.type"),
                    "model.configuration.type",
                )
            )
        credentials = {
            k: v
            for k, v in configuration.items()
            if k not in ("type", "connection", "model", "azure_deployment")
        }
        if configuration.get("connection") and any(credentials.values()):
            problems.append(
                _problem(
                    "Cannot configure model config and connection in configuration at the same time.",
                    file,
                    line_of("model.configuration.connection"),
                    "model.configuration",
                )
            )
    elif not isinstance(configuration, OpenAIModelConfiguration | AzureOpenAIModelConfiguration):
        problems.append(
            _problem(
                "model.configuration must be a mapping",
                file,
                line_of("model.configuration"),
                "model.configuration",
            )
        )
        configuration = {}

    inputs = configs.get("inputs") or {}
    if not isinstance(inputs, Mapping):
        problems.append(_problem("'inputs' must be a mapping", file, line_of("inputs"), "inputs"))
        inputs = {}
    clean_inputs: dict[str, Mapping[str, Any]] = {}
    for name, spec in inputs.items():
        if isinstance(spec, Mapping):
            clean_inputs[str(name)] = dict(spec)
        else:
            problems.append(
                _problem(
                    f"input '{name}' must be a mapping such as {{type: string, default: ...}}",
                    file,
                    line_of(f"inputs.{name}"),
                    f"inputs.{name}",
                )
            )
    outputs = configs.get("outputs") or {}
    if not isinstance(outputs, Mapping):
        problems.append(_problem("'outputs' must be a mapping", file, line_of("outputs"), "outputs"))
        outputs = {}

    try:
        sandbox_environment().parse(preprocess_template_string(template))
    except jinja2.TemplateSyntaxError as exc:
        problems.append(
            _problem(
                f"template syntax error: {exc.message}",
                file,
                template_line + (exc.lineno or 1) - 1,
                "template",
            )
        )
    if problems:
        _raise(problems)
    return PromptySpec(
        path=path,
        name=str(configs.get("name") or path.stem),
        description=str(configs.get("description") or ""),
        api=api,
        configuration=configuration,
        parameters=dict(parameters),
        response=response,
        inputs=clean_inputs,
        outputs=dict(outputs),
        sample=configs.get("sample"),
        template=template,
        template_line=template_line,
        data=configs,
    )


# -- running --------------------------------------------------------------------------------------------


def resolve_inputs(spec: PromptySpec, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The template variables: given values (or the sample when none), defaults, only declared inputs."""
    values = dict(values or {})
    if not values and spec.sample:
        values = _sample_inputs(spec.sample, spec.path.parent)
    resolved: dict[str, Any] = {}
    missing = []
    for name, definition in spec.input_signature().items():
        if name not in values and "default" not in definition:
            missing.append(name)
            continue
        resolved[name] = values.get(name, definition.get("default"))
    if missing:
        raise PromptyError(f"Missing required inputs: {missing}")
    return resolved


def _parse_env(value: Any) -> Any:
    if isinstance(value, str):
        match = _ENV_ONLY_RE.match(value)
        if match:
            return os.environ.get(match.group(1), value)
    return value


def _connection_from_env(ctype: str) -> Connection:
    if ctype == "azure_open_ai":
        endpoint, key = os.environ.get("AZURE_OPENAI_ENDPOINT"), os.environ.get("AZURE_OPENAI_API_KEY")
        if endpoint is None or key is None:
            raise PromptyError(
                "Required environment variables ['AZURE_OPENAI_ENDPOINT', 'AZURE_OPENAI_API_KEY'] to build "
                "AzureOpenAIConnection not set."
            )
        return Connection.azure_open_ai(
            "azure_openai_from_env",
            api_base=endpoint,
            api_key=key,
            api_version=os.environ.get("OPENAI_API_VERSION"),
        )
    key = os.environ.get("OPENAI_API_KEY")
    if key is None:
        raise PromptyError(
            "Required environment variables ['OPENAI_API_KEY'] to build OpenAIConnection not set."
        )
    return Connection.open_ai(
        "openai_from_env",
        api_key=key,
        base_url=os.environ.get("OPENAI_BASE_URL"),
        organization=os.environ.get("OPENAI_ORG_ID"),
    )


def resolve_connection(spec: PromptySpec, connections: Mapping[str, Connection] | None = None) -> Connection:
    """The connection a prompty's configuration means: by name, from its own fields, or from the environment."""
    cfg = spec.configuration
    if isinstance(cfg, OpenAIModelConfiguration | AzureOpenAIModelConfiguration):
        ctype = cfg._type
        fields = {k: v for k, v in asdict(cfg).items()}
    else:
        raw_type = str(cfg.get("type") or "")
        ctype = (
            "azure_open_ai"
            if raw_type.lower() in ("azure_openai", "azure_open_ai", "azureopenai")
            else "open_ai"
        )
        fields = {k: v for k, v in cfg.items() if k != "type"}
    name = fields.get("connection")
    if name:
        if not isinstance(name, str):
            raise PromptyError(f"{spec.file}: model.configuration.connection must be a connection name")
        if connections and name in connections:
            return connections[name]
        return get_connection(name)
    values = {k: _parse_env(v) for k, v in fields.items()}
    credentials = {
        k: v for k, v in values.items() if v and k not in ("azure_deployment", "model", "connection")
    }
    if not credentials:
        return _connection_from_env(ctype)
    if ctype == "azure_open_ai":
        endpoint = values.get("api_base") or values.get("azure_endpoint")
        if not endpoint:
            raise PromptyError(f"{spec.file}: model.configuration needs azure_endpoint")
        return Connection.azure_open_ai(
            spec.name, api_base=endpoint, api_key=values.get("api_key"), api_version=values.get("api_version")
        )
    return Connection.open_ai(
        spec.name,
        api_key=values.get("api_key"),
        base_url=values.get("base_url"),
        organization=values.get("organization"),
    )


def render_prompty(spec: PromptySpec, inputs: Mapping[str, Any]) -> list[dict[str, Any]] | str:
    """The rendered prompt: chat messages, or the completion prompt text."""
    template = preprocess_template_string(spec.template)
    path = spec.file
    offset = spec.template_line - 1
    if spec.api == "completion":
        return render_template(template, inputs, template_path=path, line_offset=offset)
    # prompty escapes role lines in every input (prompt flow's core Escaper does not look into dicts).
    return build_messages(
        template,
        inputs,
        inputs_to_escape=list(inputs),
        recurse_dicts=False,
        template_path=path,
        line_offset=offset,
    )


def _request_params(spec: PromptySpec, prompt: Any, connection: Connection) -> dict[str, Any]:
    params = copy.deepcopy(dict(spec.parameters))
    if connection.type == "azure_open_ai":
        params.setdefault("extra_headers", {}).update(
            {"ms-azure-ai-promptflow-called-from": "promptflow-core"}
        )
    params["model"] = spec.model_name
    if spec.api == "completion":
        params["prompt"] = prompt
    else:
        params["messages"] = prompt
    try:
        if "tools" in params:
            validate_tools(params["tools"])
            params["tool_choice"] = process_tool_choice(params.get("tool_choice"))
        elif "functions" in params:
            validate_functions(params["functions"])
            params["function_call"] = process_function_call(params.get("function_call"))
    except LLMNodeError as exc:
        raise PromptyError(f"{spec.file}: {exc}") from None
    return params


def _format_choice(text: Any, spec: PromptySpec, is_json: bool) -> Any:
    if not is_json:
        return text
    try:
        result = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise PromptyError(f"{spec.file}: the response is not valid JSON: {exc}") from None
    if not spec.outputs:
        return result
    picked = {}
    for key in spec.outputs:
        if not isinstance(result, dict) or key not in result:
            keys = list(result.keys()) if isinstance(result, dict) else []
            raise PromptyError(f"Cannot find {key} in response {keys}")
        picked[key] = result[key]
    return picked


async def _first_choice_stream(source: Any) -> Any:
    """Deltas of the first choice only, skipping empty ones (prompt flow's format_stream)."""
    async for piece in source:
        if piece:
            yield piece


async def run_prompty(
    spec: PromptySpec,
    inputs: Mapping[str, Any],
    *,
    connections: Mapping[str, Connection] | None = None,
    stream: bool = False,
    retry: llm.RetryPolicy | None = None,
) -> LLMNodeResult:
    """Run a prompty: render, call the model, and shape the output as prompt flow's Prompty does.

    Streams when parameters.stream is true or stream is requested, unless the output must be parsed
    (json_object) or the whole response is wanted (response: all).
    """
    values = resolve_inputs(spec, inputs)
    connection = resolve_connection(spec, connections)
    prompt = render_prompty(spec, values)
    params = _request_params(spec, prompt, connection)
    response_format = params.get("response_format") or {}
    is_json = isinstance(response_format, Mapping) and response_format.get("type") == "json_object"
    first = spec.response != "all"
    want_stream = bool(params.get("stream")) or stream
    if want_stream and first and not is_json:
        params["stream"] = True
        result = await call_model(connection, spec.api, params, retry=retry)
        result.output = _first_choice_stream(result.output)
        return result
    streamed = bool(params.get("stream"))
    if streamed:
        # The answer must be whole before it can be parsed or returned raw.
        result = await call_model(connection, spec.api, params, retry=retry)
        text = "".join([piece async for piece in result.output])
        result.streaming = False
        result.output = _format_choice(text, spec, is_json) if first else text
        return result
    body = dict(params)
    response = await llm.create(
        connection, "completion" if spec.api == "completion" else "chat", body, policy=retry
    )
    from flowengine.tools.llm_tool import trace_request

    result = LLMNodeResult(
        output=None,
        usage=llm.usage_dict(getattr(response, "usage", None)),
        request=trace_request(connection, spec.api, params),
    )
    if not first:
        result.output = response.model_dump()
        return result
    choice = response.choices[0]
    if spec.api == "completion":
        result.output = _format_choice(choice.text, spec, is_json)
    elif choice.finish_reason in ("tool_calls", "function_calls"):
        # prompt flow compares with "function_calls" (not the API's "function_call"), so function calls give content.
        result.output = _format_choice(response.model_dump()["choices"][0]["message"], spec, False)
    else:
        result.output = _format_choice(getattr(choice.message, "content", ""), spec, is_json)
    return result


# -- the user-facing class ------------------------------------------------------------------------------


class Prompty:
    """A prompty usable from user code as prompt flow's: `Prompty.load(source=..., model=...)(**inputs)`."""

    def __init__(self, path: str | Path, model: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._spec = load_prompty(Path(path), model=model, **kwargs)
        self._name = self._spec.name
        self._model = self._spec.data.get("model", {})
        self._inputs = self._spec.inputs
        self._outputs = self._spec.outputs
        self._sample = self._spec.sample
        self._template = self._spec.template
        self._data = self._spec.data

    @property
    def path(self) -> Path:
        """The prompty file."""
        return self._spec.path.resolve()

    @property
    def code(self) -> Path:
        """The folder of the prompty file."""
        return self._spec.path.parent.resolve()

    @property
    def spec(self) -> PromptySpec:
        """The loaded specification."""
        return self._spec

    @classmethod
    def load(cls, source: str | Path, **kwargs: Any) -> Prompty:
        """Load a .prompty file; `model=` overrides (merged into) its model section."""
        source_path = Path(source)
        if not source_path.exists():
            raise PromptyError(f"Source {source_path.absolute().as_posix()} does not exist")
        if source_path.suffix != ".prompty":
            raise PromptyError("Source must be a file with .prompty extension.")
        return cls(path=source_path, **kwargs)

    def _check_args(self, args: tuple[Any, ...], what: str) -> None:
        if args:
            raise PromptyError(f"Prompty can only be {what} with keyword arguments.")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the prompty synchronously; returns text, a dict, or a generator of text when streaming."""
        self._check_args(args, "called")
        result = llm.run_sync(run_prompty(self._spec, kwargs))
        if result.streaming:
            return llm.iterate_sync(result.output)
        return result.output

    def render(self, *args: Any, **kwargs: Any) -> str:
        """The rendered prompt as text (chat messages are shown as their list)."""
        self._check_args(args, "rendered")
        return str(render_prompty(self._spec, resolve_inputs(self._spec, kwargs)))


class AsyncPrompty(Prompty):
    """A prompty whose call is a coroutine."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Run the prompty; returns text, a dict, or an async iterator of text when streaming."""
        self._check_args(args, "called")
        result = await run_prompty(self._spec, kwargs)
        return result.output
