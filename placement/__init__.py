"""pdserve.placement"""
