"""Checkpoints: the official `ckpts/` layout, what a configuration needs, the download record, the Hub, download.

- `layout`: where each part of a release lives below the model root (`CheckpointLayout`, `model_root`).
- `hub`: repository listings and file transfers through huggingface_hub, offline mode, the endpoint.
- `needs`: which repositories and files one configuration needs (`DownloadConfig`, `sources`).
- `record`: `<root>/.cache/hyimage/downloads.json`, the listings read and the files checked.
- `download`: what is missing (`plan_download`), fetching and hashing it (`download`, `complete`), and the
  check before loading (`check_present`).

Imports run one way (`download` -> `record` -> `needs` -> `hub`, `layout`). Of hyimage outside this package,
only the bottom modules (`hyimage.errors`, `hyimage.variants`) are imported.
"""
