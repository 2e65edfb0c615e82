"""Traffic control: the `throttle` rule action (rate and concurrency limits with a bounded queue).

`spec` is what a rule file says (imported by the rules); `throttler` admits statements at run time
(`local` and `shared` keep the limits in this worker's memory and in Redis)."""
