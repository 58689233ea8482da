import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import multiplier, number, read_json, write_outputs  # noqa: E402

values = read_json("INPUT_ARRAY")
result = number(len(values) * multiplier())
print(f"length {len(values)} x{multiplier():g} = {result}")
write_outputs(("number-array-length-json", "length.json", {"length": result}))
