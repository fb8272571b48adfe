"""Shots + state -> a plan: what each shot needs (create, replace, restore, ...); guards; prices."""
