import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import multiplier, number, read_json, write_outputs  # noqa: E402

values = read_json("INPUT_ARRAY")
result = number(sum(values) * multiplier())
print(f"sum of {len(values)} numbers x{multiplier():g} = {result}")
write_outputs(("number-array-sum-json", "sum.json", {"sum": result}))
