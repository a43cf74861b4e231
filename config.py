"""Command-line configuration shared by train.py and eval.py (in the manner of nanoGPT's
configurator): a script's DEFAULTS dict, then JSON files (--config FILE, a later one over an
earlier one), then --key value or --key=value flags. Every key is checked against the defaults (an unknown key is an error that lists
the valid ones) and parsed to the type of its default; `choices` restricts a key to listed values.
"""
import json


def parse_value(key, text, default):
    """A value as the type of `default` (bool, int, float or str). A command-line string is
    converted; a JSON value must already have that type (a number also serves a float or a string
    key, e.g. "goal": 0.5), so 1.9 for an int key or null for a string key is an error rather than
    a silent 1 or 'None'."""
    kind = type(default)
    if not isinstance(text, str):
        is_number = isinstance(text, (int, float)) and not isinstance(text, bool)
        if (kind is bool and isinstance(text, bool) or kind is int and is_number and isinstance(text, int)
                or kind in (float, str) and is_number):
            return kind(text)
        raise ValueError(f"config key {key!r}: expected a JSON {kind.__name__} like {json.dumps(default)}, "
                         f"got {json.dumps(text)}")
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config key {key!r}: expected a boolean (true/false), got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"config key {key!r}: expected a {kind.__name__} like {default!r}, got {text!r}") from None


def read_config_file(path):
    """The JSON object of config keys in `path`; a message naming the file otherwise."""
    with open(path) as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path}: invalid JSON ({error})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"config file {path}: expected a JSON object of config keys, got {type(entries).__name__}")
    return entries


def parse_config(argv, defaults, choices=None, presets=None):
    """defaults <- presets[the chosen value of its key] (a JSON file path, when a preset applies)
    <- --config FILE <- --key value flags. presets: {key: {value: path}}, e.g. {"world": {"toy":
    "configs/train_toy.json"}}: the settings that value stands for, below the user's own."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: expected --key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"flag {arg} has no value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        pairs.append((key, value))
    # every --config file below every flag; a later file over an earlier one
    files = [item for key, path in pairs if key == "config" for item in read_config_file(path).items()]
    overrides = files + [(key, value) for key, value in pairs if key != "config"]
    cfg = dict(defaults)
    for key, value in overrides:
        if key not in defaults:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(defaults)}")
        cfg[key] = parse_value(key, value, defaults[key])
    for key, table in (presets or {}).items():
        if cfg[key] in table:
            preset = {k: parse_value(k, v, defaults[k]) for k, v in read_config_file(table[cfg[key]]).items()}
            cfg = {**cfg, **{k: v for k, v in preset.items() if k not in dict(overrides)}}
    for key, allowed in (choices or {}).items():
        if cfg[key] not in allowed:
            raise ValueError(f"config key {key!r}: expected one of {', '.join(map(str, allowed))}, got {cfg[key]!r}")
    return cfg


def show_help(argv, doc, defaults):
    """-h / --help in argv: print the script's docstring and its defaults, and say so."""
    if "-h" not in argv and "--help" not in argv:
        return False
    print(doc + "\nDefaults (override with --key value):\n" + "\n".join(f"  --{k} {v!r}" for k, v in defaults.items()))
    return True
