"""Helpers for testing code that uses the dispatcher: local stand-ins for what cannot run here.

Each stand-in is an emulation of a platform's documented behaviour and says so; see its
module for the documents it follows and what it leaves out.
"""
