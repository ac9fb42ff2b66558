"""The config path every step starts from: the environment report (step 1), the install plan, resolving
a preset into a concrete config (step 3), and preparing step 4's config (which fetches what sampling
needs, then resolves the same way on every process).

Modules: `envinfo` (machine report and hardware recommendations), `install_plan` (install only what is
missing, never torch), `resolve` (asset markers, `runs:` paths, `auto` values), `prepare` (step 4), `notebook` (the notebooks'
work folder, torchrun from a cell, inline figures).
"""
