"""The benchmarks, run from the checkout's root with `python -m bench.<package>.<name>`.

- `bench.harness`: what they share: running the app as a user does (`serve_run`), the one
  closed-loop load driver (`load`), and generic outputs (`results`).
- `bench.serving`: the served app over HTTP on this machine (`compare`, `layouts`,
  `adapters`, `profile`), and the peers it is compared with (`seed_server`, `bare`).
- `bench.engine`: in-process on the pipeline, no server (`levers`, `caches`, `threads`).
- `bench.gpu`: the GPU benchmark, `python -m bench.gpu`.

Figures are written under bench/results/.
"""
