// The draft-length policy of `MTP(n_draft="auto")`.
//
// Every iteration of the MTP loop the policy picks k, the number of tokens to
// draft (0 = a plain decoding step), to maximise the expected number of
// tokens per second.  It learns, from what the loop measures in this session:
//
//   V(n)   microseconds of a target decode of n tokens after a draft (n = k + 1),
//   P      microseconds of a plain step's target decode in a run of plain steps
//          (measured apart: right after the MTP head ran, or after a decode of
//          another shape, the same decode costs more -- no graph to reuse -- and
//          the next few still cost more: it is measured in a pair of plain steps,
//          or in a run of `plain_run` when plain decoding is close to the best),
//   D      microseconds per draft token (one MTP-head decode + its sampling),
//   C(m)   microseconds to catch the MTP context up on m tokens (cf + cp * m),
//   S      microseconds of sampling / acceptance per iteration,
//   a_j    the probability that draft position j is accepted given that
//          positions 1..j-1 were (acceptance by position),
//
// and scores each k with
//
//   E(k) = 1 + sum_{i=1..k} prod_{j=1..i} a_j          (tokens per iteration)
//   T(0) = P + S,  T(k) = V(k+1) + S + k * D + cf + cp * E(k)   (cost per iteration)
//   R(k) = E(k) / T(k)
//
// (a plain step's row is kept and fed to the MTP head later in one batch, so
// its catch-up cost is paid when drafting resumes; it is charged to the
// drafting iterations, where it belongs).  Each cost is a low quantile of its
// last samples (robust to slow steps when another process takes the CPU for a
// moment, yet following a lasting change within a few iterations)
// and the acceptances are exponentially decayed counts, so the policy follows
// changes (another process loading the CPU, a text that becomes predictable).
// It explores: it measures every length twice first, then regularly re-measures
// the length whose estimate is the oldest (those far behind the best, 4x less
// often), and when plain decoding wins it still probes the most promising draft
// length after a gap that grows while drafting keeps losing, within a budget of
// 1% of the time (up to `max_gap` iterations), so it never locks itself into
// "off".
//
// The draft's confidence: the head's probability p of each draft token says
// how likely the target is to accept it.  The policy keeps a calibration,
// q(p) = P(accepted | p) in NB buckets of p (decayed counts, prior q = p), fed
// by every drafted token whose predecessors were accepted and, for free, by
// the first token a cut left out when the whole draft before it was accepted
// (the target's next token says whether it would have been accepted).  While
// drafting, a token is left out -- and drafting stops -- when q(p) is below
// the break-even acceptance of one more token at the current rate,
//   tau = (dV + D) * R(best)       (dV when it would be the last token),
// with dV the marginal cost of verifying one more token: upstream's `p_min`,
// learned and priced.  The cut changes how many tokens are drafted, so the
// scores above use pass rates u_j = P(token j survives the cut | 1..j-1 did),
// the share of the probabilities seen at draft position j (a decayed histogram
// per position) that the cut in force keeps: k * D becomes the expected head
// decodes and V(k+1) the verification cost averaged over the number drafted;
// a_j counts a cut token as not accepted.  Each length has its own cut (priced
// with its own marginal verification cost) and is scored under it.  The cut
// applies from the second measuring pass on (the first one feeds the
// calibration), to probes as well (a probe measures drafting as it would be
// done), except when a length's verification cost has gone stale: its cut
// stopped every draft of it before the end for `stale_iters` iterations and
// `stale_choices` choices, so the cost that prices the cut was not measured
// again (a slow first measurement -- pages faulted in, another process -- would
// otherwise keep that cut, and the length, shut for good); that draft is made
// without the cut.
//
// A close call is measured more: while drafting could still win (scored with
// its acceptances one standard error up) and has been measured fewer than
// `refine_iters` times, the policy goes on drafting after a drafting iteration
// (if plain decoding really wins, that loses little: the call was close).  The
// same between the best length b and b + 1, whose last position is seen only
// when b + 1 is drafted: while b + 1 could still win (that position's
// acceptance one standard error up) and was chosen fewer than `refine_iters`
// times, it is drafted instead of b.
//
// The policy only chooses the *length*: every choice keeps the output exactly
// that of plain decoding (the target verifies every draft).  It is plain C++
// with no llama.cpp dependency, so its unit tests feed it synthetic traces.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// A low quantile (the 25th percentile) of the last N samples of a cost.  A
// stall (another process takes the CPU in the middle of a step) only ever adds
// time, so a low quantile sees through up to 3 stalls in 4 samples, and it
// still follows a lasting change within a few iterations.
struct mtp_cy_low_quantile {
    static const int N = 9;
    double buf[N];
    int    n = 0;       // samples seen (saturates at N in the buffer)
    int    next = 0;

    void clear() { n = 0; next = 0; }
    void add(double x) {
        buf[next] = x;
        next = (next + 1) % N;
        if (n < N) {
            ++n;
        }
    }
    double get() const {
        if (n == 0) {
            return 0.0;
        }
        double tmp[N];
        std::copy(buf, buf + n, tmp);
        const int q = (n - 1) / 4;
        std::nth_element(tmp, tmp + q, tmp + n);
        return tmp[q];
    }
};

struct mtp_cy_policy {
    static const int KMAX = 16;

    // configuration
    int    k_max   = 4;       // the longest draft it may choose
    int    min_gap = 8;       // iterations between probes of drafting when plain decoding wins
    int    max_gap = 4096;    // ... the gap doubles up to this, or to what the budget allows
    double probe_budget = 0.01;  // share of the time probes may cost while plain decoding wins
    int    lag_window = 256;  // the MTP head is fed at most this many positions it missed
    int    explore_every = 16;  // iterations between tries of a neighbour of the best length
    int    far_every = 4;       // ... of a length far behind it (below far_ratio of its score)
    double far_ratio = 0.8;
    double w_cost  = 0.1;     // forgetting factor of the catch-up cost fit
    double decay   = 0.97;    // acceptance counts decay per observation of a position
    double prior_w = 2.0;     // weight of the acceptance prior (pseudo-observations)
    double prior_a1 = 0.6;    // prior acceptance of the first draft position
    // a close call: while drafting could still win (its score with the acceptances one
    // standard error up beats plain decoding) and it has been measured fewer than
    // `refine_iters` times, go on drafting (that loses little when the call is close)
    double refine_z = 1.0;
    int    refine_iters = 32;

    // learned state
    mtp_cy_low_quantile v_q25[KMAX + 2];
    double v_us[KMAX + 2];  int64_t v_n[KMAX + 2];   // target decode of n tokens after a draft (n >= 1)
                                                     // and of a plain step (n = 0)
    mtp_cy_low_quantile d_q25, s_q25;
    double d_us;            int64_t d_n;             // per draft token
    double s_us;            int64_t s_n;             // sampling per iteration
    // catch-up cost: weighted least squares of t = cf + cp * m with forgetting
    double c_w, c_m, c_mm, c_t, c_mt;                int64_t c_n;
    // confidence calibration: decayed counts of accepted draft tokens by bucket of p
    static const int NB = 20;
    double cal_hits[NB], cal_tries[NB];
    double cal_decay = 0.98;  // per observation of a bucket
    double cal_prior_w = 2.0; // weight of the prior q = p (pseudo-observations)
    bool   cut_active;                    // false during the first measuring pass
    double tau_mid, tau_last;             // break-even acceptances of the cut in force
    // the cut each draft length would be drafted under (priced with its own marginal
    // verification cost; draft a token of this bucket?): the score of length k is that of
    // drafting k under its cut.  Row 0 is never priced: it keeps every token.
    bool   k_mid[KMAX + 1][NB], k_last[KMAX + 1][NB];
    int    cut_row;                       // the cut in force: its row (0: none)
    // a length's verification cost is re-measured without the cut when it has gone
    // stale: its cut stopped every draft of it before the end (the cost of verifying
    // the whole draft, priced in the cut, is then never measured again -- a slow
    // first measurement would keep the cut, and the length, shut for good)
    int    stale_iters = 32;    // ... for this many iterations
    int    stale_choices = 1;   // ... and this many choices of the length
    int64_t v_last[KMAX + 2];   // iteration of the last sample of V(n)
    int64_t v_miss[KMAX + 1];   // choices of length k since V(k + 1) was last sampled
    // the draft by position: decayed counts, by bucket of their probability, of the
    // tokens drafted at position j whose predecessors were accepted (pos_hist) and of
    // those among them that were (or, cut, would have been) accepted (pos_acc).  The
    // pass rate and the acceptance of a position under any cut follow from them.
    double pos_hist[KMAX + 1][NB], pos_acc[KMAX + 1][NB], pos_tot[KMAX + 1];
    bool   conf_fed;                      // observe_confidence() fed this iteration's draft
    double p_min = 0.0;                   // the user's p_min, applied with the cut

    // decisions
    int64_t iter;
    int64_t chosen[KMAX + 1];
    int     last_k;
    int     best;             // the length with the best score at the last decision
    int64_t next_probe;       // iteration of the next probe while plain decoding wins
    int     gap;
    int64_t next_explore;
    int64_t explore_slot;          // explorations so far
    int64_t last_seen[KMAX + 1];   // iteration at which each length was last chosen
    int64_t n_drafting;            // iterations that drafted (at least one head decode)
    bool    last_plain;            // the last iteration observed was a plain step
    int     plain_left;            // plain steps still to make in a run measuring plain decoding
    // a run of plain steps measuring plain decoding: a pair, or `plain_run` steps when plain
    // decoding is close to the best (its score at least close_ratio of the best one): in a
    // session that drafts, a plain step costs more than in a long run of them (on the 239M
    // model, measured: pairs priced it ~25% above a plain session's step, runs of 4 ~10%,
    // runs of 8 at it), and a close call must price the run that choosing plain decoding
    // would get
    int     plain_run = 8;
    double  close_ratio = 0.8;

    mtp_cy_policy() { reset(); }

    void configure(int kmax) {
        k_max = std::max(1, std::min(kmax, (int) KMAX));
        reset();
    }

    void reset() {
        std::fill(v_us, v_us + KMAX + 2, 0.0);
        std::fill(v_n, v_n + KMAX + 2, (int64_t) 0);
        for (auto & m : v_q25) {
            m.clear();
        }
        d_q25.clear();
        s_q25.clear();
        d_us = 0.0; d_n = 0;
        s_us = 0.0; s_n = 0;
        c_w = c_m = c_mm = c_t = c_mt = 0.0; c_n = 0;
        for (auto & row : pos_hist) {
            std::fill(row, row + NB, 0.0);
        }
        for (auto & row : pos_acc) {
            std::fill(row, row + NB, 0.0);
        }
        conf_fed = false;
        std::fill(pos_tot, pos_tot + KMAX + 1, 0.0);
        n_drafting = 0;
        last_plain = false;
        plain_left = 0;
        std::fill(cal_hits, cal_hits + NB, 0.0);
        std::fill(cal_tries, cal_tries + NB, 0.0);
        for (int k = 0; k <= KMAX; ++k) {
            std::fill(k_mid[k], k_mid[k] + NB, true);
            std::fill(k_last[k], k_last[k] + NB, true);
        }
        std::fill(v_last, v_last + KMAX + 2, (int64_t) -1);
        std::fill(v_miss, v_miss + KMAX + 1, (int64_t) 0);
        cut_row = 0;
        cut_active = false;
        tau_mid = tau_last = 0.0;
        iter = 0;
        std::fill(chosen, chosen + KMAX + 1, (int64_t) 0);
        last_k = -1;
        best = -1;
        next_probe = 0;
        gap = min_gap;
        next_explore = explore_every;
        explore_slot = 0;
        std::fill(last_seen, last_seen + KMAX + 1, (int64_t) -1);
    }

    // Forget the acceptance (by position, and the confidence calibration), keep the costs:
    // a call whose sampler differs from the last one's (greedy vs sampled, another
    // temperature, the other spec_sampling rule) accepts drafts at other rates.
    void reset_acceptance() {
        for (auto & row : pos_hist) {
            std::fill(row, row + NB, 0.0);
        }
        for (auto & row : pos_acc) {
            std::fill(row, row + NB, 0.0);
        }
        std::fill(pos_tot, pos_tot + KMAX + 1, 0.0);
        std::fill(cal_hits, cal_hits + NB, 0.0);
        std::fill(cal_tries, cal_tries + NB, 0.0);
        for (int k = 0; k <= KMAX; ++k) {
            std::fill(k_mid[k], k_mid[k] + NB, true);
            std::fill(k_last[k], k_last[k] + NB, true);
        }
        cut_row = 0;
        conf_fed = false;
    }

    // -- estimates ---------------------------------------------------------------
    static void sample(mtp_cy_low_quantile & q25, double & est, int64_t & n, double x) {
        q25.add(x);
        est = q25.get();
        ++n;
    }

    // does the cut of length k (and p_min) draft a token of bucket b at position j of k?
    bool kept(int b, int j, int k) const {
        return (j >= k ? k_last : k_mid)[k][b] && (b + 0.5) / NB >= p_min;
    }

    // Pass rates u[1..n] and acceptances a[1..n] of the first n positions of a draft of k,
    // under the cut in force (and p_min), in one pass over the positions:
    //   u[j]  probability that draft token j survives the cut given that 1..j-1 were
    //         drafted and accepted: the share of the tokens seen at position j that the
    //         cut keeps, with a prior (u[j-1]; 1 for the first) worth prior_w tokens (a
    //         deep position is seen rarely: a few unlucky tokens there must not rule it
    //         out for good);
    //   a[j]  probability that it is drafted and accepted: the kept and accepted share,
    //         with a prior (a[j-1]; prior_a1 * u[1] for the first) worth prior_w tokens.
    // z > 0: each a[j] from position z_from on optimistic, z standard errors up (the
    // priors stay unbiased).
    void rates(int n, int k, double z, double * u, double * a, int z_from = 1) const {
        double u_prev = 1.0, a_prev = 0.0;
        for (int j = 1; j <= n; ++j) {
            double n_kept = 0.0, n_acc = 0.0;
            for (int b = 0; b < NB; ++b) {
                if (kept(b, j, k)) {
                    n_kept += pos_hist[j][b];
                    n_acc += pos_acc[j][b];
                }
            }
            const double w = pos_tot[j] + prior_w;
            u[j] = (n_kept + prior_w * u_prev) / w;
            const double prior = j <= 1 ? prior_a1 * u[1] : a_prev;
            const double aj = (n_acc + prior_w * prior) / w;
            a[j] = z > 0.0 && j >= z_from ? std::min(1.0, aj + z * std::sqrt(aj * (1.0 - aj) / w)) : aj;
            u_prev = u[j];
            a_prev = aj;
        }
    }

    // u[j] of rates(): the probability that draft token j of k survives the cut
    double pass(int j, int k) const {
        if (j < 1 || j > KMAX) {
            return 1.0;
        }
        double u[KMAX + 1], a[KMAX + 1];
        rates(j, k, 0.0, u, a);
        return u[j];
    }

    // a[j] of rates(): the probability that draft position j (1-based) of k is drafted
    // and accepted given that 1..j-1 were
    double accept(int j, int k, double z = 0.0) const {
        if (j < 1 || j > KMAX) {
            return 0.0;
        }
        double u[KMAX + 1], a[KMAX + 1];
        rates(j, k, z, u, a);
        return a[j];
    }

    double expected_tokens(int k, double z = 0.0, int z_from = 1) const {
        double u[KMAX + 1], a[KMAX + 1];
        rates(k, k, z, u, a, z_from);
        double e = 1.0, run = 1.0;
        for (int j = 1; j <= k; ++j) {
            run *= a[j];
            e += run;
        }
        return e;
    }

    // what drafting k brings to the target, in expectation: head decodes, and the cost
    // of verifying (the number drafted varies with the cut: V is averaged over it)
    void expected_draft(int k, double & heads, double & verify) const {
        heads = verify = 0.0;
        double u[KMAX + 1], a[KMAX + 1];
        rates(k, k, 0.0, u, a);
        double at_least = 1.0;     // P(at least j tokens drafted)
        for (int j = 1; j <= k; ++j) {
            heads += at_least;     // token j is decoded when 1..j-1 were drafted
            const double next = at_least * u[j];
            verify += (at_least - next) * verify_cost(j);     // exactly j-1 drafted
            at_least = next;
        }
        verify += at_least * verify_cost(k + 1);
    }

    static int bucket(double p) {
        const int b = (int) (p * NB);
        return b < 0 ? 0 : (b >= NB ? NB - 1 : b);
    }

    // calibrated probability that a draft token of probability p is accepted
    double calibrated(double p) const {
        const int b = bucket(p);
        const double prior = (b + 0.5) / NB;
        return (cal_hits[b] + cal_prior_w * prior) / (cal_tries[b] + cal_prior_w);
    }

    // may a draft token of probability p be drafted now (last: it would end the draft)?
    bool keeps(double p, bool last) const {
        return (last ? k_last : k_mid)[cut_row][bucket(p)];
    }

    // the lowest p from which every bucket up is kept (the cut as a p_min)
    double cut_below(bool last) const {
        const bool * keep = (last ? k_last : k_mid)[cut_row];
        int b = NB;
        while (b > 0 && keep[b - 1]) {
            --b;
        }
        return (double) b / NB;
    }

    // V(i) as measured; a plain step stands in for V(1) until a 1-token verification
    // after a draft was measured
    bool v_has(int i) const { return v_n[i] > 0 || (i == 1 && v_n[0] > 0); }
    double v_at(int i) const { return v_n[i] > 0 ? v_us[i] : v_us[0]; }

    // cost of a target decode of n >= 1 tokens after a draft
    double verify_cost(int n) const {
        if (v_has(n)) {
            return v_at(n);
        }
        // a straight line through the two nearest measured sizes (or flat: optimistic)
        int lo = -1, hi = -1;
        for (int i = n - 1; i >= 1; --i) { if (v_has(i)) { lo = i; break; } }
        for (int i = n + 1; i <= KMAX + 1; ++i) { if (v_has(i)) { hi = i; break; } }
        if (lo > 0 && hi > 0) {
            return v_at(lo) + (v_at(hi) - v_at(lo)) * (double) (n - lo) / (double) (hi - lo);
        }
        if (lo > 0) {
            int lo2 = -1;
            for (int i = lo - 1; i >= 1; --i) { if (v_has(i)) { lo2 = i; break; } }
            if (lo2 > 0) {
                const double slope = std::max(0.0, (v_at(lo) - v_at(lo2)) / (double) (lo - lo2));
                return v_at(lo) + slope * (double) (n - lo);
            }
            return v_at(lo);
        }
        return hi > 0 ? v_at(hi) : 0.0;
    }

    // cost of a plain step's target decode in a run of plain steps (right after the MTP
    // head ran, or after a decode of another shape, the same decode costs more: llama.cpp
    // has no graph of that shape to reuse)
    double plain_cost() const {
        return v_n[0] > 0 ? v_us[0] : verify_cost(1);
    }

    void catch_up_fit(double & cf, double & cp) const {
        cf = 0.0; cp = 0.0;
        if (c_n == 0 || c_w <= 0.0) {
            return;
        }
        const double mm = c_m / c_w, mt = c_t / c_w;
        const double var = c_mm / c_w - mm * mm;
        if (var > 1e-9 * std::max(1.0, mm * mm)) {
            cp = std::max(0.0, (c_mt / c_w - mm * mt) / var);
            cf = std::max(0.0, mt - cp * mm);
        } else {
            cp = mm > 0 ? mt / mm : 0.0;
        }
    }

    double cost(int k) const {
        if (k <= 0) {
            return plain_cost() + s_us;
        }
        double heads, verify, cf, cp;
        expected_draft(k, heads, verify);
        catch_up_fit(cf, cp);
        return verify + s_us + heads * d_us + cf + cp * expected_tokens(k);
    }

    // The cut of each draft length, and the one in force for the next draft (of k; on
    // a plain step, that of the best length, or k_max): a token is drafted when its
    // calibrated acceptance pays for verifying it (and, unless it is the last, for
    // drafting the next one) at the rate of the best choice, the marginal verification
    // cost being that of the length's own draft.  Each length is scored as it would
    // be drafted: under its own cut (scoring every length under the cut priced for
    // another would shut the others out when that one's verification looks dear).
    void set_cut(bool active, int k) {
        cut_active = active && d_n > 0;
        if (!cut_active) {
            for (int i = 0; i <= k_max; ++i) {
                std::fill(k_mid[i], k_mid[i] + NB, true);
                std::fill(k_last[i], k_last[i] + NB, true);
            }
            cut_row = 0;
            tau_mid = tau_last = 0.0;
            return;
        }
        const double rate = score(best >= 0 ? best : k);                // tokens per microsecond
        const int kk = k > 0 ? k : (best > 0 ? best : k_max);           // the draft in force
        double q[NB];
        for (int b = 0; b < NB; ++b) {
            q[b] = calibrated((b + 0.5) / NB);
        }
        const double v1 = verify_cost(1);
        for (int i = 1; i <= k_max; ++i) {
            const double dv = std::max(0.0, (verify_cost(i + 1) - v1) / (double) i);
            const double t_last = dv * rate, t_mid = (dv + d_us) * rate;
            for (int b = 0; b < NB; ++b) {
                k_mid[i][b] = q[b] >= t_mid;
                k_last[i][b] = q[b] >= t_last;
            }
            if (i == kk) {
                tau_last = t_last;
                tau_mid = t_mid;
            }
        }
        cut_row = kk;
    }

    // a draft token of probability p was (or would have been) accepted or not
    // (position: its place in the draft, 1-based, when it is known; its predecessors
    // were accepted)
    void observe_confidence(double p, bool accepted, int position = 0) {
        const int b = bucket(p);
        cal_hits[b] = cal_hits[b] * cal_decay + (accepted ? 1.0 : 0.0);
        cal_tries[b] = cal_tries[b] * cal_decay + 1.0;
        if (position >= 1 && position <= KMAX) {
            observe_position(position, b, accepted);
            conf_fed = true;
        }
    }

    void observe_position(int j, int b, bool accepted) {
        for (int i = 0; i < NB; ++i) {
            pos_hist[j][i] *= decay;
            pos_acc[j][i] *= decay;
        }
        pos_hist[j][b] += 1.0;
        pos_acc[j][b] += accepted ? 1.0 : 0.0;
        pos_tot[j] = pos_tot[j] * decay + 1.0;
    }

    // expected tokens per microsecond of drafting k (z > 0: with optimistic acceptances
    // from draft position z_from on)
    double score(int k, double z = 0.0, int z_from = 1) const {
        const double t = cost(k);
        return t > 0.0 ? expected_tokens(k, z, z_from) / t : 0.0;
    }

    // Iterations between probes so that probing costs at most `probe_budget` of the
    // time: a probe costs what it loses against plain steps making the same tokens,
    // plus feeding the MTP head the positions it missed (at most lag_window of them).
    int budget_gap(int pk) const {
        double cf, cp;
        catch_up_fit(cf, cp);
        const double plain = cost(0);
        if (plain <= 0.0) {
            return min_gap;
        }
        // what a probe loses against plain steps making the same tokens (its catch-up apart)
        const double e = expected_tokens(pk);
        const double extra = std::max(0.0, cost(pk) - cp * e - e * plain);
        // with a gap of g iterations: (extra + cp * min(g, lag_window)) / (g * plain) <= budget
        const double b = probe_budget * plain;
        double g = (extra + cp * lag_window) / b;          // solution with g >= lag_window
        if (b > cp) {
            const double g_small = extra / (b - cp);       // solution with g < lag_window
            if (g_small <= lag_window) {
                g = g_small;
            }
        }
        return (int) std::max((double) min_gap, std::min((double) max_gap, std::ceil(g)));
    }

    // Does feeding the MTP head the positions it missed alone cost more than the probe
    // budget (per plain step)?  Then a probe after g plain steps costs that share of
    // the time whatever g is (up to lag_window): quick re-checks would only add to it.
    bool lag_over_budget() const {
        double cf, cp;
        catch_up_fit(cf, cp);
        return cp >= probe_budget * cost(0);
    }

    // the gap before the first probe once plain decoding wins: short (drafting may have
    // lost by chance), unless catching up alone breaks the budget
    int first_gap() const {
        return lag_over_budget() ? budget_gap(1) : min_gap;
    }

    // -- decisions ---------------------------------------------------------------
    int choose() {
        int k;
        if (iter < 2 * k_max + 4) {
            // measure every length twice: 0, 0, 0 (the first step after the prompt does
            // not count as a plain step's cost), 1 .. k_max, 0, 1 .. k_max
            const int i = (int) iter;
            k = i < 3 ? 0 : (i < k_max + 3 ? i - 2 : i - (k_max + 3));
        } else {
            int b = 0;
            const double s0 = score(0);
            double bs = s0;
            for (int i = 1; i <= k_max; ++i) {
                const double s = score(i);
                if (s > bs * (1.0 + 1e-9)) {
                    bs = s;
                    b = i;
                }
            }
            if (b == 0 && best != 0) {
                gap = first_gap();                   // drafting just started losing
                next_probe = iter + gap;
            }
            best = b;
            k = b;
            if (b == 0) {
                // the most promising draft length (optimistic: what it may be worth
                // given how little was seen of it)
                int pk = 1;
                double ps = score(1, refine_z);
                for (int i = 2; i <= k_max; ++i) {
                    const double s = score(i, refine_z);
                    if (s > ps) { ps = s; pk = i; }
                }
                if (n_drafting < refine_iters && last_k > 0 && ps >= bs) {
                    // a close call on little data: go on drafting to measure it more (it
                    // loses little if plain decoding really wins; the MTP head is caught up)
                    k = pk;
                } else if (iter >= next_probe) {
                    // probe it
                    k = pk;
                    gap = lag_over_budget() ? budget_gap(pk) : std::min(budget_gap(pk), gap * 2);
                    next_probe = iter + gap;
                }
            } else if (plain_left > 0) {
                k = 0;                 // the rest of a run of plain steps (a plain step's cost)
                --plain_left;
            } else if (b < k_max && chosen[b + 1] < refine_iters &&
                       score(b + 1, refine_z, b + 1) >= bs) {
                // a close call between the best length and the next one: the next one's
                // last position is seen only when it is drafted (the positions before are
                // seen all the time), a few times at a few places of the text.  Draft it
                // while it could still win (that position's acceptance one standard error
                // up) -- it loses little if it really loses, the call being close -- until
                // it was chosen refine_iters times.
                k = b + 1;
            } else if (iter >= next_explore) {
                // measure again the length whose estimate is the oldest (costs and
                // acceptances drift; a length never tried again would keep a stale score);
                // plain decoding is measured with a run of plain steps (the first one,
                // right after a draft, does not cost what a run of plain steps does: a
                // pair, `plain_run` steps when plain decoding is close to the best).
                // Lengths far behind the best (even optimistically) only every
                // `far_every`-th time: re-measuring them is what exploring costs most.
                const bool far_turn = ++explore_slot % far_every == 0;
                int ok = -1;
                int64_t age = -1;
                for (int i = 0; i <= k_max; ++i) {
                    if (i != b && iter - last_seen[i] > age &&
                        (far_turn || score(i, refine_z) >= far_ratio * bs)) {
                        age = iter - last_seen[i];
                        ok = i;
                    }
                }
                if (ok >= 0) {
                    k = ok;
                    plain_left = ok != 0 ? 0 : (s0 >= close_ratio * bs ? plain_run - 1 : 1);
                }
                next_explore = iter + explore_every;
            }
        }
        // re-measure a verification cost gone stale without the cut (see v_miss)
        const bool uncut = k > 0 && iter >= 2 * k_max + 4 && v_miss[k] >= stale_choices &&
                           iter - v_last[k + 1] >= stale_iters;
        set_cut(iter >= k_max + 3, k);   // from the second measuring pass on
        if (uncut) {
            cut_active = false;
            cut_row = 0;
        }
        if (k > 0) {
            ++v_miss[k];
        }
        last_k = k;
        last_seen[k] = iter;
        chosen[k]++;
        ++iter;
        return k;
    }

    // What one iteration measured: k drafted (after p_min, possibly fewer than
    // chosen), n_acc of them accepted, the target decoded k+1 tokens in t_verify_us;
    // the draft took t_draft_us for n_draft_steps head decodes; the catch-up fed
    // n_catch_up tokens in t_catch_up_us; sampling took t_sample_us.
    //
    // k_chosen: the length asked of the drafter (-1: k, nothing cut); when fewer were
    // drafted, the draft was cut at token k + 1 (by the confidence cut or p_min).
    void observe(int k, int n_acc, double t_verify_us, double t_draft_us, int n_draft_steps,
                 double t_catch_up_us, int n_catch_up, double t_sample_us, int k_chosen = -1) {
        k = std::max(0, std::min(k, (int) KMAX));
        k_chosen = k_chosen < 0 ? k : std::max(k, std::min(k_chosen, (int) KMAX));
        const bool cut = k_chosen > k;
        // a plain step after a plain step apart from a decode right after the MTP head
        // ran (or after the prompt): llama.cpp reuses the graph of a decode of the same
        // shape, and a run of plain steps is what choosing plain decoding gets
        const bool plain = k == 0 && n_draft_steps == 0 && n_catch_up == 0;
        const int vi = plain && last_plain ? 0 : k + 1;
        sample(v_q25[vi], v_us[vi], v_n[vi], t_verify_us);
        v_last[vi] = iter - 1;
        if (vi >= 2) {
            v_miss[vi - 1] = 0;
        }
        last_plain = plain;
        sample(s_q25, s_us, s_n, t_sample_us);
        if (n_draft_steps > 0) {
            sample(d_q25, d_us, d_n, t_draft_us / (double) n_draft_steps);
        }
        if (n_catch_up > 0) {
            if (c_n >= 4) {
                // a stall (another process took the CPU) must not distort the fit
                double cf, cp;
                catch_up_fit(cf, cp);
                t_catch_up_us = std::min(t_catch_up_us, 3.0 * (cf + cp * n_catch_up) + 50.0);
            }
            const double f = 1.0 - w_cost;
            c_w = c_w * f + 1.0;
            c_m = c_m * f + n_catch_up;
            c_mm = c_mm * f + (double) n_catch_up * n_catch_up;
            c_t = c_t * f + t_catch_up_us;
            c_mt = c_mt * f + (double) n_catch_up * t_catch_up_us;
            ++c_n;
        }
        // acceptance by position, when observe_confidence() did not feed it with the
        // draft's probabilities: drafted tokens as sure ones, a cut token as an unsure
        // one that was not accepted
        if (!conf_fed) {
            const int last_j = cut ? k + 1 : k;
            for (int j = 1; j <= last_j && j <= n_acc + 1; ++j) {
                observe_position(j, j <= k ? NB - 1 : 0, j <= n_acc);
            }
        }
        conf_fed = false;
        if (n_draft_steps > 0) {
            ++n_drafting;
        }
    }
};
