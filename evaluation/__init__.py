"""nextchat.evaluation"""
