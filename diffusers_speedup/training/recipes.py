"""Training recipes: YAML files, resolvable by name, with ``base:`` inheritance and ``key.sub=value`` overrides,
loaded into a typed, validated `Config`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import Config, ConfigError, _omegaconf_message, with_family_defaults
from .validation import validate_config


def recipes_dir() -> Path:
    """The folder of the shipped recipes: ``diffusers_speedup/configs`` in an installed wheel, the checkout's
    ``configs/`` when the package is imported from a clone (including ``pip install -e``)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def list_recipes() -> list[str]:
    """Names of the shipped recipes, e.g. ``quickstart``, ``imagenet256/dit_xl2_speed``."""
    root = recipes_dir()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def resolve_recipe(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """The recipe file that `name_or_path` means.

    An existing file wins (relative to `relative_to` when given, as for ``base:``); otherwise it is the name of a
    shipped recipe, with or without ``.yaml`` and with or without a leading ``configs/``, so that
    ``imagenet256/dit_xl2_speed`` and ``configs/imagenet256/dit_xl2_speed.yaml`` work with or without a clone.
    """
    path = Path(name_or_path)
    candidate = relative_to / path if relative_to is not None else path
    if candidate.is_file():
        return candidate
    name = path.as_posix().removesuffix(".yaml")
    name = name.removeprefix("configs/")
    shipped = recipes_dir() / f"{name}.yaml"
    if not path.is_absolute() and shipped.is_file():
        return shipped
    if candidate.is_dir():
        raise IsADirectoryError(f"{candidate} is a directory, not a recipe file (.yaml)")
    raise FileNotFoundError(f"{candidate} does not exist and is not the name of a shipped recipe")


def _read_recipe_file(path: Path) -> DictConfig:
    """One recipe file as a mapping; anything else (not text, not YAML, a list, a scalar) is one ConfigError."""
    import yaml

    try:
        parsed = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not a YAML text file (it is not UTF-8 text).") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"Config file {path} is not valid YAML{line}: {problem}.") from None
    if parsed is None:
        return OmegaConf.create({})
    if not isinstance(parsed, dict):
        kind = {list: "list", str: "string"}.get(type(parsed), type(parsed).__name__)
        raise ConfigError(
            f"Config file {path} holds a YAML {kind}, not a mapping of sections (model:, data:, train:, ...)."
        )
    try:
        recipe = OmegaConf.load(path)  # OmegaConf's own YAML reading (its float syntax, duplicate-key check)
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise ConfigError(f"Config file {path}: {' '.join(str(error).split())}") from None
    return recipe


def _load_recipe(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """A recipe file merged over the recipe its ``base:`` key names (a file relative to this one, or the name of a
    shipped recipe), recursively."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'base' chain loops back to itself ({' -> '.join(map(str, chain + (path,)))}).")
    recipe = _read_recipe_file(path)
    base = recipe.pop("base", None) if isinstance(recipe, DictConfig) else None
    if base is None:
        return recipe
    try:
        base_path = resolve_recipe(str(base), relative_to=path.parent)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise ConfigError(f"Config file {error} (named as base by {path}).") from None
    return OmegaConf.merge(_load_recipe(base_path, chain + (path,)), recipe)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a recipe, apply ``key.sub=value`` overrides, validate, and return the typed config.

    `path` is a YAML file or the name of a shipped recipe (``quickstart``, ``imagenet256/dit_xl2_speed``; see
    `list_recipes`). A recipe may start with ``base: other.yaml`` (a file relative to its own folder, or a shipped
    recipe's name) to take that recipe and change only what it lists.

    Raises:
        ConfigError: naming the file and the key for unknown keys, wrong types and contradictory options.
    """
    schema = OmegaConf.structured(Config)
    source = "defaults"
    try:
        if path is not None:
            source = str(path)
            try:
                recipe_path = resolve_recipe(path)
            except IsADirectoryError as error:
                raise ConfigError(f"Config file {error}.") from None
            except FileNotFoundError as error:
                raise ConfigError(f"Config file {error}; shipped recipes: {', '.join(list_recipes())}.") from None
            schema = OmegaConf.merge(schema, _load_recipe(recipe_path))
        for override in overrides:
            source = f"override {override!r}"
            if "=" not in override:
                raise ConfigError(f"Override {override!r} is not of the form key.sub=value.")
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist([override]))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_omegaconf_message(error)}") from None
    config: Config = with_family_defaults(OmegaConf.to_object(schema))
    validate_config(config)
    return config


def config_from_mapping(mapping: dict | DictConfig) -> Config:
    """A typed, validated config from a plain mapping (e.g. the ``config.yaml`` saved with a checkpoint)."""
    try:
        config = with_family_defaults(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), mapping)))
    except OmegaConfBaseException as error:
        raise ConfigError(_omegaconf_message(error)) from None
    validate_config(config)
    return config
