"""The ClientApp's own cost: Flower starts a fresh process per message on a deployed device."""

import json
import os
import subprocess
import sys
from pathlib import Path

# In a fresh process, as a SuperNode runs a message: the expert is asked for, delivered and asked
# for again through the real ClientApp, and the training side is never imported.
PROBE = """
import json, sys
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from client.client_app import app
from shared.wire import EXPERT_DELIVER, EXPERT_RECORD, EXPERT_STATUS, HAS_EXPERT
from simulations.inprocess import InProcessGrid

package = json.loads(sys.argv[1])
files = {name: value.encode() for name, value in package["files"].items()}
grid = InProcessGrid(app, [{}], {})

def ask(request, expert=None):
    content = {"config": ConfigRecord(request)} | ({EXPERT_RECORD: ConfigRecord(expert)} if expert else {})
    reply = grid.deliver(Message(content=RecordDict(content), message_type=MessageType.QUERY, dst_node_id=1000))
    return int(reply.content.metric_records["metrics"][HAS_EXPERT])

status = {"action": EXPERT_STATUS, "expert-digest": package["digest"]}
answers = [ask(status), ask({"action": EXPERT_DELIVER}, {**files, "digest": package["digest"]}), ask(status)]
print(json.dumps({"answers": answers, "loaded": sorted(m for m in ("torch", "transformers", "peft", "bitsandbytes")
                                                      if m in sys.modules)}))
"""


def test_an_expert_query_is_answered_without_loading_the_training_side(tmp_path):
    from shared.adapter_files import ADAPTER_FILES, adapter_digest

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    files = {name: f"the bytes of {name}" for name in ADAPTER_FILES}
    for name, text in files.items():
        (adapter / name).write_text(text)
    package = {"files": files, "digest": adapter_digest(adapter)}
    home = tmp_path / "device"
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(package)], cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "NEXTQUILL_HOME": str(home)}, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result == {"answers": [0, 1, 1], "loaded": []}
    assert adapter_digest(home / "experts" / package["digest"]) == package["digest"]
