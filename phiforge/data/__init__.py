"""The data recipe (Phi-3 report section 2): filter, classify, deduplicate, decontaminate, synthesize.

Each stage is a module with main(argv); `phiforge data <stage>` dispatches to it (see cli.py) and
`phiforge data run recipe.yaml` chains them. Shared I/O and the resumable shard loop live in io.py.
"""
