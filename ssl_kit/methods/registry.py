"""The method registry. A method is one file under `ssl_kit/methods/`: it declares its stage config (a `StageBase`
subclass with `method: Literal["name"]`, its own keys, defaults, bounds and docs) and registers itself:

    @register("byol", BYOLConfig)
    class BYOL(PretextMethod): ...

Registration makes the name valid in recipes (the schema joins the recipe's stage union), in `ssl-kit methods`,
and in `build_method`. `ssl_kit.methods` imports every module of this package, so a new file is all it takes."""
from __future__ import annotations

from pydantic import BaseModel

from ..config import StageBase, register_stage_schema
from ..errors import ConfigError

_METHODS: dict[str, type] = {}


def register(name: str, config: type[StageBase]):
    """Class decorator: register a Method subclass under `name` with its stage config class."""

    def decorate(cls: type) -> type:
        if not (config.__dict__.get("recommended") and config.__dict__.get("recommended_source")):
            raise TypeError(f"method {name!r}: {config.__name__} must state its own `recommended` optimizer/schedule "
                            "settings and `recommended_source` (the paper or reference implementation they come from)")
        if name in _METHODS and _METHODS[name] is not cls:
            raise TypeError(f"method {name!r} is registered twice ({_METHODS[name].__name__}, {cls.__name__})")
        register_stage_schema(name, config)
        cls.name, cls.config_class = name, config
        _METHODS[name] = cls
        return cls

    return decorate


def registered_methods() -> dict[str, type]:
    """{name: Method class} of every registered method, in registration order."""
    return dict(_METHODS)


def method_options(name: str) -> list[dict]:
    """The keys method `name` adds to a stage (those every stage has left out), nested sections flattened to
    dotted keys: [{key, default, description}]."""
    config = build_method(name).config_class
    common = set(StageBase.model_fields) | {"method"}
    return [row for key, field in config.model_fields.items() if key not in common for row in _field_rows(key, field)]


def _field_rows(key: str, field) -> list[dict]:
    """One row per leaf of config field `key` (a sub-config expands into key.sub rows)."""
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return [row for sub, sub_field in type(default).model_fields.items()
                for row in _field_rows(f"{key}.{sub}", sub_field)]
    return [{"key": key, "default": default, "description": field.description or ""}]


def build_method(name: str) -> type:
    """The class implementing training method `name`; ConfigError listing the known ones otherwise."""
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]
