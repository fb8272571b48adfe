"""Plain values imgbatch counts in: a quota (K requests per P seconds) and money; and the
bounded read (`bounded.read_at_most`) every file imgbatch accepts only up to a size goes through.

At the bottom of the layering, below `errors`: an error from the service carries the quota it
states, the manifest declares quotas and prices, the pacer and the cost guard use them. Nothing
here imports any other part of imgbatch.
"""
