"""Do two engine processes on two cores slow each other down? Decode step times alone, then with a
second process looping 256-token prefills on the other core (the disaggregated pair's situation).

    python benchmarks/colocation_check.py alone
    python benchmarks/colocation_check.py bg 60 &  sleep 8; python benchmarks/colocation_check.py with_bg_prefill
"""

import sys, time, torch
torch.set_num_threads(1)
from pdserve.engine.engine import Engine
from pdserve.engine.profiling import time_prefill, time_decode
e = Engine.from_config('smollm2-135m')
if sys.argv[1] == 'bg':
    t_end = time.time() + float(sys.argv[2])
    while time.time() < t_end:
        time_prefill(e, [256], repeats=1)
else:
    for ctx in ([300], [300]*4, [300]*8):
        print(sys.argv[1], len(ctx), 'decode', round(time_decode(e, ctx, repeats=10)*1e3,1), 'ms', flush=True)
    print(sys.argv[1], 'prefill256', round(time_prefill(e, [256], repeats=3)*1e3,1), 'ms', flush=True)
