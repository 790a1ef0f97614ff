"""The axes of the OPD formula as pure tensor functions (no models, no I/O).

    Route A (direct):  L = E_{y~mu} sum_t w_t * D_Omega(pi_T(.|s_t), pi_theta(.|s_t))
    Route B (PG):      L = -E_{y~mu} sum_t w_t * (pi_theta/mu)(y_t) * sg[A_t]     (gradient: A_t * grad log pi_theta)

Modules: ``divergence`` (f-divergences over a support), ``support`` (which tokens the divergence sees),
``policy_gradient`` (advantages and the PG loss), ``reduce`` (masked aggregation).
"""
