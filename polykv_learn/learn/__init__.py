"""Learning the router and the budget allocator (Lightning)."""
