"""Connection classes with prompt flow's names and attributes, for user code (`promptflow.connections`)."""

from __future__ import annotations

import os
from typing import Any

from flowengine.connections import DEFAULT_AZURE_API_VERSION, SCRUBBED, Connection


class Secret(str):
    """Marks a custom strong-type connection field as secret (prompt flow's contracts.types.Secret)."""


class _Connection:
    """Base of the connection classes: `name`, `type`, `configs`, `secrets`, `keys()` and `conn[key]`."""

    TYPE = "_NOT_SET"

    def __init__(self, name: str | None = None, module: str = "promptflow.connections", configs: dict | None = None,
                 secrets: dict | None = None, **kwargs: Any) -> None:
        self.name = name
        self.type = self.TYPE
        self.class_name = f"{self.TYPE}Connection"
        self.configs = configs or {}
        self.module = module
        self.secrets = secrets or {}
        self.expiry_time = kwargs.get("expiry_time")
        self.created_date = kwargs.get("created_date")
        self.last_modified_date = kwargs.get("last_modified_date")

    def keys(self) -> list:
        """The config and secret keys."""
        return list(self.configs.keys()) + list(self.secrets.keys())

    def __getitem__(self, item: str) -> Any:
        if item in self.secrets:
            return self.secrets[item]
        if item in self.configs:
            return self.configs[item]
        raise KeyError(f"Key {item!r} not found in connection {self.name!r}.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, configs={self.configs!r}, secrets=<hidden>)"


class _StrongTypeConnection(_Connection):
    @property
    def api_key(self) -> Any:
        """The API key."""
        return self.secrets.get("api_key", SCRUBBED)

    @api_key.setter
    def api_key(self, value: Any) -> None:
        self.secrets["api_key"] = value


class OpenAIConnection(_StrongTypeConnection):
    """An OpenAI (or OpenAI-compatible) connection."""

    TYPE = "OpenAI"

    def __init__(self, api_key: str, organization: str | None = None, base_url: str | None = None, **kwargs: Any) -> None:
        if base_url in ("", "_"):
            base_url = None
        super().__init__(configs={"organization": organization, "base_url": base_url}, secrets={"api_key": api_key},
                         **kwargs)

    @property
    def organization(self) -> Any:
        """The organization."""
        return self.configs.get("organization")

    @organization.setter
    def organization(self, value: Any) -> None:
        self.configs["organization"] = value

    @property
    def base_url(self) -> Any:
        """The base URL."""
        return self.configs.get("base_url")

    @base_url.setter
    def base_url(self, value: Any) -> None:
        self.configs["base_url"] = value

    @classmethod
    def from_env(cls, name: str | None = None) -> OpenAIConnection:
        """From OPENAI_API_KEY, OPENAI_BASE_URL and OPENAI_ORG_ID."""
        api_key = os.getenv("OPENAI_API_KEY")
        if api_key is None:
            raise ValueError("Required environment variables ['OPENAI_API_KEY'] to build OpenAIConnection not set.")
        return cls(api_key=api_key, organization=os.getenv("OPENAI_ORG_ID"), base_url=os.getenv("OPENAI_BASE_URL"),
                   name=name)


class AzureOpenAIConnection(_StrongTypeConnection):
    """An Azure OpenAI connection."""

    TYPE = "AzureOpenAI"

    def __init__(self, api_base: str, api_key: str | None = None, api_type: str = "azure",
                 api_version: str = DEFAULT_AZURE_API_VERSION, auth_mode: str = "key",
                 resource_id: str | None = None, **kwargs: Any) -> None:
        configs = {"api_base": api_base, "api_type": api_type, "api_version": api_version, "auth_mode": auth_mode,
                   "resource_id": resource_id}
        secrets = {"api_key": api_key} if auth_mode == "key" else {}
        super().__init__(configs=configs, secrets=secrets, **kwargs)

    @property
    def api_base(self) -> Any:
        """The endpoint."""
        return self.configs.get("api_base")

    @api_base.setter
    def api_base(self, value: Any) -> None:
        self.configs["api_base"] = value

    @property
    def api_type(self) -> Any:
        """The API type ("azure")."""
        return self.configs.get("api_type")

    @property
    def api_version(self) -> Any:
        """The API version."""
        return self.configs.get("api_version")

    @api_version.setter
    def api_version(self, value: Any) -> None:
        self.configs["api_version"] = value

    @property
    def auth_mode(self) -> Any:
        """The auth mode ("key")."""
        return self.configs.get("auth_mode", "key")

    @property
    def resource_id(self) -> Any:
        """The ARM resource id, if any."""
        return self.configs.get("resource_id")

    @classmethod
    def from_env(cls, name: str | None = None) -> AzureOpenAIConnection:
        """From AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and OPENAI_API_VERSION."""
        api_base, api_key = os.getenv("AZURE_OPENAI_ENDPOINT"), os.getenv("AZURE_OPENAI_API_KEY")
        if api_base is None or api_key is None:
            raise ValueError("Required environment variables ['AZURE_OPENAI_ENDPOINT', 'AZURE_OPENAI_API_KEY'] to "
                             "build AzureOpenAIConnection not set.")
        version = os.getenv("OPENAI_API_VERSION")
        return cls(api_base=api_base, api_key=api_key, name=name, **({"api_version": version} if version else {}))


class ServerlessConnection(_StrongTypeConnection):
    """A serverless (OpenAI-compatible) endpoint connection."""

    TYPE = "Serverless"

    def __init__(self, api_key: str, api_base: str, **kwargs: Any) -> None:
        super().__init__(configs={"api_base": api_base}, secrets={"api_key": api_key}, **kwargs)

    @property
    def api_base(self) -> Any:
        """The endpoint."""
        return self.configs.get("api_base")


class CustomConnection(_Connection):
    """A custom connection: `configs` and `secrets`, each key also readable as an attribute."""

    TYPE = "Custom"

    def __init__(self, secrets: dict, configs: dict | None = None, **kwargs: Any) -> None:
        super().__init__(secrets=secrets, configs=configs, **kwargs)

    def __getattr__(self, item: str) -> Any:
        if item in ("secrets", "configs"):
            return super().__getattribute__(item)
        secrets = self.__dict__.get("secrets", {})
        configs = self.__dict__.get("configs", {})
        if item in secrets:
            return secrets[item]
        if item in configs:
            return configs[item]
        return super().__getattribute__(item)

    def is_secret(self, item: str) -> bool:
        """Whether `item` is one of the secrets."""
        return item in self.secrets


class CustomStrongTypeConnection(_Connection):
    """Base for typed custom connections: annotate fields with `str` or `Secret`."""

    TYPE = "Custom"

    def __init__(self, secrets: dict, configs: dict | None = None, **kwargs: Any) -> None:
        super().__init__(secrets=secrets, configs=configs or {}, **kwargs)

    def __getattribute__(self, item: str) -> Any:
        annotations = getattr(super().__getattribute__("__class__"), "__annotations__", {})
        if item in annotations:
            if annotations[item] in (Secret, "Secret"):
                return super().__getattribute__("secrets")[item]
            return super().__getattribute__("configs")[item]
        return super().__getattribute__(item)


_CLASS_BY_TYPE = {"open_ai": "OpenAIConnection", "openai_compatible": "OpenAIConnection",
                  "azure_open_ai": "AzureOpenAIConnection", "custom": "CustomConnection"}


def to_promptflow_connection(conn: Connection, module: Any = None) -> Any:
    """The `promptflow.connections` object for a Connection (prompt flow's own classes when it is installed)."""
    if module is None:
        import importlib

        module = importlib.import_module("promptflow.connections")
    cls = getattr(module, _CLASS_BY_TYPE[conn.type])
    secrets = dict(conn.secrets)
    configs = dict(conn.configs)
    if conn.type == "custom":
        return cls(secrets=secrets, configs=configs, name=conn.name)
    if conn.type == "azure_open_ai":
        keep = ("api_type", "api_version", "auth_mode", "resource_id")
        return cls(api_base=configs.get("api_base"), api_key=secrets.get("api_key"), name=conn.name,
                   **{k: configs[k] for k in keep if configs.get(k) is not None})
    return cls(api_key=secrets.get("api_key"), organization=configs.get("organization"),
               base_url=configs.get("base_url"), name=conn.name)


def from_promptflow_connection(obj: Any) -> Connection:
    """The Connection for a prompt flow connection object (ours or prompt flow's)."""
    cls_name = type(obj).__name__
    secrets = {k: v for k, v in dict(getattr(obj, "secrets", {}) or {}).items() if v is not None}
    configs = dict(getattr(obj, "configs", {}) or {})
    name = getattr(obj, "name", None) or "connection"
    if cls_name == "AzureOpenAIConnection":
        return Connection(name=name, type="azure_open_ai", configs=configs, secrets=secrets)
    if cls_name in ("OpenAIConnection", "ServerlessConnection"):
        if cls_name == "ServerlessConnection":
            base = str(configs.get("api_base") or "")
            configs = {"base_url": base if base.endswith("/v1") else base + "/v1"}
            return Connection(name=name, type="openai_compatible", configs=configs, secrets=secrets)
        return Connection(name=name, type="open_ai", configs=configs, secrets=secrets)
    return Connection(name=name, type="custom", configs=configs, secrets=secrets)
