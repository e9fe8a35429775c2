"""nextchat.training"""
