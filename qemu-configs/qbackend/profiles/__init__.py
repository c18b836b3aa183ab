"""Machine profiles (one JSON file each), shipped as package data and read
with importlib.resources by `qbackend.machine.launch.load_machine_config`."""
