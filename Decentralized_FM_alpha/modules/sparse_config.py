"""SparseConfig: everything that decides how a run is sparse, in one typed, serialisable value.

It is built once, at the edge of a command (the runner's flags and upstream's environment
names: from_args; the lm-eval adapter's model_args: from_values; JSON: from_dict / load), then
handed to the code that sets a stage up (sparse_execution.apply_sparse). Nothing below the
edge reads flags or the environment. A run saves it beside its results (save).

Upstream's environment names, read by from_args only where the flag is not given:

    SPARSE_MODE -> mode            SPRARSE_PATH (or SPARSE_PATH) -> sparse_path
    TOPK -> mlp_keep               ATTN_TOPK_1 -> att_keep
    LAYER=n -> layers "n-"         PREDICTOR_DTYPE -> predictor_dtype
    PREDICTOR_DATASET -> predictor_dataset
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from dejavu_common.helpers import KeepError, check_keep, keep_argument, write_json_atomic

PREDICTOR_DTYPES = ("float32", "float16", "bfloat16")
CONFIG_FILE_SUFFIX = ".sparse_config.json"  # beside a run's results file


class SparseConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SparseConfig:
    mode: str = "predicted"  # a name of sparse_execution.MODES
    mlp_keep: float | None = None  # MLP neurons kept per token: a fraction in (0, 1] or a count (None: no fixed K)
    att_keep: float | None = None  # heads kept per token, the same way
    layers: str = "all"  # the sparse layers (dejavu_common.helpers.parse_layers syntax), resolved per stage
    layer_mlp_keep: dict = field(default_factory=dict)  # {layer: kept value} in place of mlp_keep there
    mlp_keep_file: str | None = None  # an allocation file (dejavu_common.allocation_format) filling layer_mlp_keep
    sparse_mlp: bool = True
    sparse_attention: bool = True
    sparse_path: str | None = None  # folder of the predictors and thresholds files
    predictor_dataset: str = "c4"  # the label in the predictor files' names ({label}_layer{L}.pt)
    thresholds: str | None = None  # teal / cats: the thresholds file (default: sparse_path/thresholds_{mode}.json)
    predictor_dtype: str = "float32"
    use_gather: bool = True  # decoding reads the kept rows only (False: always mask)
    stats_file: str | None = None  # --sparse-stats

    def __post_init__(self):
        for name, keep in (("mlp_keep", self.mlp_keep), ("att_keep", self.att_keep)):
            if keep is not None:
                _checked_keep(keep, FLAGS[name])
        if self.predictor_dtype not in PREDICTOR_DTYPES:
            raise SparseConfigError(f"--predictor-dtype {self.predictor_dtype!r}: choose one of "
                                    f"{', '.join(PREDICTOR_DTYPES)}")
        layer_keep = {}
        for layer, keep in dict(self.layer_mlp_keep or {}).items():
            try:
                index = int(layer)
            except (TypeError, ValueError):
                raise SparseConfigError(f"layer_mlp_keep: {layer!r} is not a layer index") from None
            layer_keep[index] = _checked_keep(keep, f"layer_mlp_keep[{index}]")
        object.__setattr__(self, "layer_mlp_keep", layer_keep)

    def mlp_keep_of(self, layer):
        """The MLP kept value of one layer: its own (layer_mlp_keep), else mlp_keep."""
        return self.layer_mlp_keep.get(layer, self.mlp_keep)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        data = dataclasses.asdict(self)
        data["layer_mlp_keep"] = {str(layer): keep for layer, keep in sorted(self.layer_mlp_keep.items())}
        return data

    @classmethod
    def from_dict(cls, data, source="sparse config"):
        if not isinstance(data, dict):
            raise SparseConfigError(f"{source}: not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SparseConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path):
        write_json_atomic(path, self.to_dict(), indent=2)

    def save_beside(self, results_path):
        """Saved beside a run's results file, as config_path_beside names it."""
        self.save(config_path_beside(results_path))

    @classmethod
    def load(cls, path):
        try:
            with open(path) as handle:
                data = json.load(handle)
        except OSError as error:
            raise SparseConfigError(f"cannot read {path}: {error}") from error
        except ValueError as error:
            raise SparseConfigError(f"{path}: not valid JSON ({error})") from error
        return cls.from_dict(data, source=path)


# The flag of each field (what an error names).
FLAGS = {"mode": "--sparse-mode", "mlp_keep": "--mlp-keep ($TOPK)", "att_keep": "--att-keep ($ATTN_TOPK_1)",
         "layers": "--sparse-layers", "sparse_path": "--sparse-path", "predictor_dataset": "--predictor-dataset",
         "thresholds": "--thresholds", "predictor_dtype": "--predictor-dtype", "stats_file": "--sparse-stats",
         "mlp_keep_file": "--mlp-keep-file"}


def _checked_keep(keep, flag):
    try:
        check_keep(keep, flag)
    except KeepError as error:
        raise SparseConfigError(str(error)) from None
    return float(keep)


def add_arguments(parser, modes):
    """The runner's flags of sparse execution (defaults None: from_args fills in the environment's)."""
    group = parser.add_argument_group("sparse execution (*-ml-att-sparse model types)")
    group.add_argument("--sparse-mode", choices=modes, default=None,
                       help="predicted, oracle, dense, or a training-free MLP baseline: teal, cats (Llama), wina "
                            "(default: $SPARSE_MODE or predicted)")
    group.add_argument("--sparse-path", default=None,
                       help="folder of c4_layer{L}.pt / c4_att_layer{L}.pt (c4: --predictor-dataset), and "
                            "thresholds_{teal,cats}.json (default: $SPRARSE_PATH)")
    group.add_argument("--predictor-dataset", default=None,
                       help="the label the predictors were trained under (the predictor package's --dataset): "
                            "files {label}_layer{L}.pt / {label}_att_layer{L}.pt (default: $PREDICTOR_DATASET or c4)")
    group.add_argument("--thresholds", default=None,
                       help="teal / cats: the calibrated thresholds file (default: --sparse-path/thresholds_{mode}.json)")
    group.add_argument("--mlp-keep", type=keep_argument("--mlp-keep"), default=None,
                       help="MLP neurons kept per token: a fraction in (0, 1] or a whole count up to the MLP's "
                            "width (default: $TOPK; predicted mode without it keeps the classifier's positives); "
                            "teal, cats, wina: the target kept fraction of each masked input")
    group.add_argument("--mlp-keep-file", default=None, metavar="FILE",
                       help="predicted, teal, cats: per-layer MLP kept fractions from an allocation file "
                            "(sparse_predictor/allocate.py); every sparse layer must have one, and --mlp-keep "
                            "(default: the file's target) is then only reported")
    group.add_argument("--att-keep", type=keep_argument("--att-keep"), default=None,
                       help="heads kept per token: a fraction in (0, 1] or a whole count up to the number of "
                            "heads (default: $ATTN_TOPK_1; not with teal, cats, wina)")
    group.add_argument("--sparse-layers", default=None,
                       help="'all', '4-29', '4-' (to the last) or '0,3,5' (default: all, or from $LAYER onwards)")
    group.add_argument("--sparse-attention", choices=("on", "off"), default="on")
    group.add_argument("--sparse-mlp", choices=("on", "off"), default="on")
    group.add_argument("--no-gather", action="store_true",
                       help="always mask, never gather: the MLP's neurons and (CUDA) the heads")
    group.add_argument("--predictor-dtype", choices=PREDICTOR_DTYPES, default=None,
                       help="weights the predictors run with: float32 as trained, or rounded to float16 as "
                            "upstream runs them, or to bfloat16 (float32's range: no weight too large for it); a "
                            "half type reads half the bytes per token on the CPU (default: $PREDICTOR_DTYPE or "
                            "float32)")
    group.add_argument("--sparse-stats", default=None, metavar="FILE",
                       help="write, at the end, the kept fraction each layer reached over the real tokens and "
                            "the MLP bytes per token it costs (JSON; FILE.rank{r}.json per rank when several)")


def _environment_keep(environ, name, flag):
    text = environ.get(name) or None
    if text is None:
        return None
    try:
        return keep_argument(f"{flag} (${name})")(text)
    except Exception as error:  # argparse's type error: name the variable
        raise SparseConfigError(str(error)) from None


def from_args(args, environ):
    """The SparseConfig of parsed runner flags; a flag not given takes upstream's environment name."""
    layer = environ.get("LAYER")
    return SparseConfig(
        mode=args.sparse_mode or environ.get("SPARSE_MODE") or "predicted",
        mlp_keep=args.mlp_keep if args.mlp_keep is not None else _environment_keep(environ, "TOPK", "--mlp-keep"),
        mlp_keep_file=getattr(args, "mlp_keep_file", None),
        att_keep=args.att_keep if args.att_keep is not None else _environment_keep(environ, "ATTN_TOPK_1",
                                                                                   "--att-keep"),
        layers=args.sparse_layers or (f"{layer}-" if layer not in (None, "") else "all"),
        sparse_mlp=args.sparse_mlp == "on",
        sparse_attention=args.sparse_attention == "on",
        sparse_path=args.sparse_path or environ.get("SPRARSE_PATH") or environ.get("SPARSE_PATH") or None,
        predictor_dataset=args.predictor_dataset or environ.get("PREDICTOR_DATASET") or "c4",
        thresholds=args.thresholds,
        predictor_dtype=args.predictor_dtype or environ.get("PREDICTOR_DTYPE") or "float32",
        use_gather=not args.no_gather,
        stats_file=args.sparse_stats,
    )


# model_args of the lm-eval adapter (the runner's flags under their underscore names) -> field and parser
_ON_OFF = {"on": True, "off": False}


def _boolean(name, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise SparseConfigError(f"model_args: {name}={value!r} is not true or false")


def _on_off(name, value):
    if isinstance(value, bool):
        return value
    if str(value) not in _ON_OFF:
        raise SparseConfigError(f"model_args: {name}={value!r}: choose on or off")
    return _ON_OFF[str(value)]


def _keep_value(flag):
    def parse(name, value):
        if value is None or value == "":
            return None
        try:
            return keep_argument(flag)(str(value))
        except Exception as error:
            raise SparseConfigError(f"model_args: {error}") from None
    return parse


def _text(name, value):
    if isinstance(value, (list, tuple)):  # sparse_layers=[0, 3]
        value = ",".join(str(item) for item in value)
    return None if value is None or value == "" else str(value)


VALUE_FIELDS = {  # model_arg -> (field, parse(name, value))
    "sparse_mode": ("mode", _text),
    "mlp_keep": ("mlp_keep", _keep_value("--mlp-keep")),
    "att_keep": ("att_keep", _keep_value("--att-keep")),
    "mlp_keep_file": ("mlp_keep_file", _text),
    "sparse_layers": ("layers", _text),
    "sparse_mlp": ("sparse_mlp", _on_off),
    "sparse_attention": ("sparse_attention", _on_off),
    "sparse_path": ("sparse_path", _text),
    "predictor_dataset": ("predictor_dataset", _text),
    "thresholds": ("thresholds", _text),
    "predictor_dtype": ("predictor_dtype", _text),
    "no_gather": ("use_gather", lambda name, value: not _boolean(name, value)),
    "sparse_stats": ("stats_file", _text),
    "sparse_config": (None, _text),  # a saved SparseConfig (JSON) that the other values change
}


def from_values(values):
    """The SparseConfig of the lm-eval adapter's model_args {name: value} (strings or Python
    values), under the runner flags' underscore names; sparse_config=FILE starts from a saved one."""
    unknown = sorted(set(values) - set(VALUE_FIELDS))
    if unknown:
        raise SparseConfigError(f"model_args: unknown argument(s) {', '.join(unknown)} for sparse execution; "
                                f"known: {', '.join(sorted(VALUE_FIELDS))}")
    base = SparseConfig.load(values["sparse_config"]) if values.get("sparse_config") else SparseConfig()
    changes = {}
    for name, value in values.items():
        field_name, parse = VALUE_FIELDS[name]
        if field_name is not None:
            parsed = parse(name, value)
            if parsed is not None or field_name in ("mlp_keep", "att_keep"):
                changes[field_name] = parsed
    if changes.get("mode") is None:
        changes.pop("mode", None)
    return base.replace(**changes)


def config_path_beside(results_path):
    """Where a run's SparseConfig is saved beside its results file."""
    return os.fspath(results_path) + CONFIG_FILE_SUFFIX
