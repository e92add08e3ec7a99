"""Study configs: one module per study with `get_config(arg) -> ConfigDict`."""
