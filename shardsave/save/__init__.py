"""The save path: plan (pure), stage (device to host), commit (data files, then the index), coordination."""
