import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import multiplier, number, read_json, write_outputs  # noqa: E402

total = read_json("INPUT_SUM")["sum"]
length = read_json("INPUT_LENGTH")["length"]
result = number(total / length * multiplier())
print(f"average {total}/{length} x{multiplier():g} = {result}")
write_outputs(("number-array-average-json", "average.json", {"average": result}))
