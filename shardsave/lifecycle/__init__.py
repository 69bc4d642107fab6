"""What happens around commits: the `checkpoint` state file, retention, save policies, preemption."""
