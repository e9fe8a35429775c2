"""nextchat.demo"""
