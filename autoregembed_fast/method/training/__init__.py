"""The lean training loop of AutoRegEmbed: distributed set-up and data order (`cluster`), the
parallelism (`sharding`: DDP, FSDP2), checkpoints (`checkpoint`), the three objectives
(`objectives`), the stage-2 reference cache (`references`), the loop (`loop`) and the commands
(`commands`, run as `python -m autoregembed_fast.train`)."""
