"""The planner: hardware catalogue, weight shapes, memory, roofline and comms estimates, layout search, the plan."""
