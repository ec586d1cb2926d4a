"""Samplers: Euler / Heun ODE and Euler-Maruyama SDE with classifier-free guidance, pure JAX."""
