/* Template for a collaborative unit's integration layer over both partners' self-tests.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#ifndef LEAD_SELFTEST
#define LEAD_SELFTEST lead_selftest
#endif
#ifndef PARTNER_SELFTEST
#define PARTNER_SELFTEST partner_selftest
#endif

int LEAD_SELFTEST(void);
int PARTNER_SELFTEST(void);
/* ---- template body ---- */
/* Integration layer: both partners' pieces are checked together before the
 * component is offered, and the report says which side failed. */
typedef struct {
    int lead_status;
    int partner_status;
} prefix_report;

int prefix_integrate(prefix_report *report)
{
    report->lead_status = LEAD_SELFTEST();
    report->partner_status = PARTNER_SELFTEST();
    return report->lead_status == 0 && report->partner_status == 0 ? 0 : -1;
}

int prefix_selftest(void)
{
    prefix_report report;
    return prefix_integrate(&report) == 0 ? 0 : 1;
}
